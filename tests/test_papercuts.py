"""First-hour papercuts (issue 19): messages that say what happened, and defaults from what is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _err_lines(r):
    return [ln for ln in r.output.splitlines() if ln.strip()]


@pytest.fixture()
def gallery(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    artifacts.save_embeddings(tmp_path / "g.npy", x, [f"c{i % 3}/{i}.jpg" for i in range(12)], fingerprint="m")
    artifacts.save_embeddings(tmp_path / "q.npy", x[:4], [f"c{i % 3}/q{i}.jpg" for i in range(4)], fingerprint="m")
    return tmp_path


def test_a_query_path_that_does_not_exist_is_reported_as_exactly_that(gallery, monkeypatch):
    monkeypatch.chdir(gallery)
    r = _run("query", "data/test/querry", "--model", "runs/rn", "--gallery", "g.npy")
    assert r.exit_code == 2
    assert _err_lines(r) == ["error: query path not found: data/test/querry"]


@pytest.mark.parametrize("args, message", [
    (["--tta", "flips"], "error: unknown --tta 'flips'; use flip or flip,scales"),
    (["--tta", "flip,scale"], "error: unknown --tta 'flip,scale'; use flip or flip,scales"),
    (["--qe", "3x"], "error: --qe takes a whole number of neighbours (a bare --qe means 5), got '3x'"),
    (["--qe", "2.5"], "error: --qe takes a whole number of neighbours (a bare --qe means 5), got '2.5'"),
])
def test_a_misspelt_optional_value_gets_the_useful_message(gallery, monkeypatch, args, message):
    monkeypatch.chdir(gallery)
    r = _run("query", "q.npy", "--gallery", "g.npy", *args)
    assert r.exit_code == 2
    assert _err_lines(r) == [message]


def test_bare_forms_and_real_paths_after_them_still_work(gallery, monkeypatch):
    monkeypatch.chdir(gallery)
    r = _run("query", "--qe", "q.npy", "--gallery", "g.npy", "--out", "r.json")  # a path right after a bare --qe
    assert r.exit_code == 0, r.output
    assert json.loads((gallery / "r.json.json").read_text())["stages"]["qe"]["n"] == 5
    r = _run("evaluate", "--query", "q.npy", "--gallery", "g.npy", "--qe", "--json")
    assert r.exit_code == 0, r.output
    (gallery / "flips").mkdir()  # a word that looks like a misspelt value but is an existing folder
    r = _run("query", "--tta", "flips", "--gallery", "g.npy", "--model", "x")
    assert "unknown --tta" not in r.output


def test_evaluate_says_which_cut_offs_it_left_out_and_how_to_get_map_at_r(gallery, monkeypatch):
    monkeypatch.chdir(gallery)
    assert _run("query", "q.npy", "--gallery", "g.npy", "--k", 2, "--out", "r.json").exit_code == 0
    r = _run("evaluate", "r.json", "--k", 1, 20)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "--k 20 left out: r.json holds 2 results per query" in out
    assert out.count("MAP@R and mAP need the full ranking") == 1
    cmd = out.split("`")[-2]
    assert cmd == "clipret evaluate --query q.npy --gallery g.npy"  # from the results' folder, as recorded
    # the printed command runs as written and gives the metrics the lists could not
    full = _run(*cmd.split()[1:], "--json")
    assert full.exit_code == 0 and "map@r" in json.loads(full.stdout)


def test_query_folder_defaults_to_the_gallerys_model_and_tta(tiny_dataset, tmp_path):
    from conftest import TINY_VIT

    gal, qry = tiny_dataset / "test" / "gallery", tiny_dataset / "test" / "query"
    common = ["--device", "cpu", "--workers", 0]
    r = _run("embed", gal, "--out", tmp_path / "g.npy", "--model", TINY_VIT, "--pretrained", "none", "--tta", "flip", *common)
    assert r.exit_code == 0, r.output
    r = _run("query", qry, "--gallery", tmp_path / "g.npy", "--out", tmp_path / "a.json", *common)
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"using the gallery's --model {TINY_VIT} --pretrained none --tta flip" in said
    assert "symmetric" not in said  # the gallery's TTA, not none
    r = _run("query", qry, "--gallery", tmp_path / "g.npy", "--out", tmp_path / "b.json", "--model", TINY_VIT,
             "--pretrained", "none", "--tta", "flip", *common)
    assert r.exit_code == 0, r.output
    assert "using the gallery's" not in r.output
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_query_folder_without_model_says_when_the_recorded_model_is_gone(tiny_dataset, tmp_path):
    x = np.eye(4, 8, dtype=np.float32)
    artifacts.save_embeddings(tmp_path / "g.npy", x, ["a", "b", "c", "d"], fingerprint="m",
                              flags={"model": "runs/gone", "pretrained": None, "tta": None})
    r = _run("query", tiny_dataset / "test" / "query", "--gallery", tmp_path / "g.npy")
    assert r.exit_code == 2
    assert _err_lines(r) == [f"error: {tmp_path / 'g.npy'} was embedded with --model runs/gone, which is not found "
                             "from here; pass --model"]


def test_a_results_folder_moved_with_its_gallery_still_evaluates(gallery, tmp_path):
    import shutil

    work = gallery
    assert _run("query", work / "q.npy", "--gallery", work / "g.npy", "--k", 3, "--out", work / "r.json").exit_code == 0
    side = json.loads((work / "r.json.json").read_text())
    assert side["gallery"]["relpath"] == "g.npy" and side["gallery"]["path"] == str((work / "g.npy").resolve())
    before = json.loads(_run("evaluate", work / "r.json", "--json").stdout)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(work), str(moved))
    r = _run("evaluate", moved / "r.json", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == before


def test_embed_with_a_config_and_no_weights_warns_once_unless_none_was_said(tiny_dataset, tmp_path):
    from conftest import TINY_VIT

    gal = tiny_dataset / "test" / "gallery"
    common = ["--model", TINY_VIT, "--device", "cpu", "--workers", 0]
    r = _run("embed", gal, "--out", tmp_path / "a.npy", *common)
    assert r.exit_code == 0, r.output
    assert " ".join(r.output.split()).count("is a model config without weights: the embeddings come from random weights") == 1
    r = _run("embed", gal, "--out", tmp_path / "b.npy", "--pretrained", "none", *common)
    assert r.exit_code == 0, r.output
    assert "random weights" not in r.output


@pytest.mark.slow
def test_every_command_the_demo_prints_runs_verbatim_in_a_fresh_directory(tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    r = _run("demo", "--dir", tmp_path / "demo", "--epochs", 1, "--json")
    assert r.exit_code == 0, r.output
    printed = [ln.split("$ ", 1)[1] for ln in r.output.splitlines() if ln.startswith("$ clipret ")]
    assert [shlex.split(c)[1] for c in printed] == ["train", "embed", "embed", "query", "evaluate"]
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    env = {**os.environ, "CLIPRET_DEVICE": "cpu"}
    for command in printed:
        done = subprocess.run([sys.executable, "-m", "clipret", *shlex.split(command)[1:]], cwd=fresh, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert "recall@1" in done.stdout  # the last one, evaluate, printed its table
