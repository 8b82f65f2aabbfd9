"""CLI behaviour around files: the results sidecar, hostile names, full disks, markup-safe output."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts
from clipret.cli import app
from conftest import TINY_VIT

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(r, message):
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output


@pytest.fixture
def labelled(tmp_path):
    """A 4-query, 6-item gallery with exact vectors, labels.csv, and an extra unrelated labelled id."""
    e = np.eye(3, dtype=np.float32)
    q = e[[0, 1, 2, 0]]
    g = e[[0, 0, 1, 2, 2, 1]]
    artifacts.save_embeddings(tmp_path / "q.npy", q, ["q0", "q1", "q2", "q3"], fingerprint="m")
    artifacts.save_embeddings(tmp_path / "g.npy", g, [f"g{i}" for i in range(6)], fingerprint="m")
    rows = ["q0,a", "q1,b", "q2,c", "q3,a", "g0,a", "g1,a", "g2,b", "g3,c", "g4,c", "g5,b", "other,a"]
    (tmp_path / "labels.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_evaluate_takes_the_gallery_from_the_results_sidecar_not_from_labels(labelled):
    t = labelled
    r = run("query", t / "q.npy", "--gallery", t / "g.npy", "--k", 2, "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    side = json.loads((t / "r.json.json").read_text())
    assert side["gallery"]["count"] == 6 and side["gallery"]["ids_sha256"] == artifacts.ids_digest([f"g{i}" for i in range(6)])
    assert side["query"]["count"] == 4 and side["k"] == 2
    r = run("evaluate", t / "r.json", "--labels", t / "labels.csv", "--k", 1, 2, "--json")
    assert r.exit_code == 0, r.output
    via_sidecar = json.loads(r.stdout)
    r = run("evaluate", t / "r.json", "--labels", t / "labels.csv", "--gallery", t / "g.npy", "--k", 1, 2, "--json")
    assert json.loads(r.stdout) == via_sidecar
    # R for label a is 2 (g0, g1): the labelled id "other" is not in the gallery and must not count
    assert via_sidecar["map@2"] == pytest.approx(1.0) and via_sidecar["r_precision"] == pytest.approx(1.0)


def test_evaluate_without_any_gallery_information_refuses_instead_of_guessing(labelled):
    t = labelled
    records = [{"filename": "q0", "samples": ["g0", "g1", "g2"]}, {"filename": "q1", "samples": ["g2", "g5", "g0"]}]
    (t / "seed.json").write_text(json.dumps(records))
    _one_line_error(run("evaluate", t / "seed.json", "--labels", t / "labels.csv"), "does not say which gallery")
    # the guess is available, but only when asked for: then "other" joins the gallery and R(a) = 3,
    # so q0's AP@3 is 2/3 instead of 1 (q1's is 1 either way)
    r = run("evaluate", t / "seed.json", "--labels", t / "labels.csv", "--gallery-from-labels", "--k", 3, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["map@3"] == pytest.approx((2 / 3 + 1.0) / 2)
    r = run("evaluate", t / "seed.json", "--labels", t / "labels.csv", "--gallery", t / "g.npy", "--k", 3, "--json")
    assert json.loads(r.stdout)["map@3"] == pytest.approx(1.0)
    r = run("evaluate", t / "seed.json", "--labels", t / "labels.csv", "--gallery-from-labels", "--json")
    assert json.loads(r.stdout)["n_queries"] == 2


def test_evaluate_refuses_a_gallery_other_than_the_one_searched_and_a_stale_sidecar(labelled):
    t = labelled
    run("query", t / "q.npy", "--gallery", t / "g.npy", "--k", 2, "--out", t / "r.json")
    artifacts.save_embeddings(t / "g2.npy", np.eye(3, dtype=np.float32), ["g0", "g1", "g2"], fingerprint="m")
    _one_line_error(run("evaluate", t / "r.json", "--labels", t / "labels.csv", "--gallery", t / "g2.npy"),
                    "is not the gallery")
    edited = json.loads((t / "r.json").read_text())
    edited[0]["samples"].reverse()  # edited by hand
    (t / "r.json").write_text(json.dumps(edited))
    _one_line_error(run("evaluate", t / "r.json", "--labels", t / "labels.csv"), "describes another version")


def test_duplicate_ids_in_results_are_one_line_errors(labelled):
    t = labelled
    (t / "dup.json").write_text(json.dumps([{"filename": "q0", "samples": ["g0", "g0"]}]))
    _one_line_error(run("evaluate", t / "dup.json", "--gallery", t / "g.npy", "--labels", t / "labels.csv"), "names gallery item 'g0' twice")
    (t / "dupq.json").write_text(json.dumps([{"filename": "q0", "samples": ["g0"]}, {"filename": "q0", "samples": ["g1"]}]))
    _one_line_error(run("evaluate", t / "dupq.json", "--gallery", t / "g.npy", "--labels", t / "labels.csv"), "appears twice")


def test_empty_gallery_is_one_line(labelled):
    t = labelled
    artifacts.save_embeddings(t / "empty.npy", np.zeros((0, 3), np.float32), [], fingerprint="m")
    _one_line_error(run("query", t / "q.npy", "--gallery", t / "empty.npy"), "holds no embeddings")


def test_model_flags_are_warned_about_on_npy_queries(labelled):
    t = labelled
    r = run("query", t / "q.npy", "--gallery", t / "g.npy", "--model", "ViT-B-32", "--out", t / "r.json")
    assert r.exit_code == 0 and "--model is ignored" in r.output


def _bracketed(tmp_path):
    """A folder with a good image and bad files whose names look like rich markup."""
    from PIL import Image

    folder = tmp_path / "[imgs]"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "good.png")
    (folder / "[draft] bad.jpg").write_bytes(b"not an image")
    (folder / "x[").mkdir()
    (folder / "x[" / "x].jpg").write_bytes(b"")  # its id, x[/x].jpg, reads as a closing markup tag
    return folder


def test_bracketed_file_names_are_printed_verbatim(tmp_path):
    folder = _bracketed(tmp_path)
    out = tmp_path / "[out].npy"
    r = run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "[draft] bad.jpg" in r.output and "x[/x].jpg" in r.output and str(out) in r.output
    r = run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out, "--device", "cpu", "--strict")
    _one_line_error(r, "[draft] bad.jpg")


def test_help_texts_show_json_examples_and_say_what_k_means():
    r = run("query", "--help")
    assert '"samples": [gallery ids, best first]' in r.output
    assert "Neighbours to return per query" in r.output
    r = run("evaluate", "--help")
    assert "top-k positions" in r.output


def test_embed_with_two_workers_equals_zero_workers(tiny_dataset, tmp_path):
    folder = tiny_dataset / "test" / "gallery"
    outs = []
    for w in (0, 2):
        out = tmp_path / f"w{w}.npy"
        r = run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out, "--device", "cpu",
                "--workers", w, "--batch-size", 3)
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert np.load(outs[0]).tobytes() == np.load(outs[1]).tobytes()
    assert json.loads(outs[0].with_suffix(".json").read_text())["ids"] == json.loads(outs[1].with_suffix(".json").read_text())["ids"]


def test_embed_skips_a_non_utf8_file_name_and_lists_it(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "ok.png")
    Image.new("RGB", (16, 16)).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))
    out = tmp_path / "e.npy"
    r = run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["ids"] == ["ok.png"]
    assert meta["skipped"] == [{"id": "caf\\xe9.png", "reason": "file name is not valid UTF-8; rename the file"}]


def test_embed_refuses_up_front_when_the_disk_cannot_hold_the_output(tiny_dataset, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "g.npy"
    r = run("embed", tiny_dataset / "test" / "gallery", "--model", TINY_VIT, "--pretrained", "none", "--out", out)
    _one_line_error(r, "not enough free space for the embeddings")
    assert not out.exists() and not (tmp_path / "g.npy.parts").exists()


def test_embed_disk_full_mid_write_is_one_line_and_keeps_the_old_file(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "g.npy"
    folder = tiny_dataset / "test" / "gallery"
    assert run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out).exit_code == 0
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    r = run("embed", folder, "--model", TINY_VIT, "--pretrained", "none", "--out", out)
    _one_line_error(r, "no space left on device writing")
    assert out.read_bytes() == before


def test_out_under_a_regular_file_is_one_line(labelled):
    t = labelled
    (t / "plain").write_text("x")
    _one_line_error(run("query", t / "q.npy", "--gallery", t / "g.npy", "--out", t / "plain" / "r.json"),
                    "a parent of it is a file")


def test_automatic_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    from clipret import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.resolve_workers(None, 10_000) == 2  # not os.cpu_count()
    assert runtime.resolve_workers(None, 100) == 0  # a small job decodes in the main process
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runtime.resolve_workers(None, 10_000) == runtime.MAX_AUTO_WORKERS
    assert runtime.resolve_workers(3, 10) == 3  # an explicit value wins
    from clipret.errors import ClipretError

    with pytest.raises(ClipretError):
        runtime.resolve_workers(-1, 10)


def test_help_texts_say_what_each_k_means_and_claim_no_untested_best():
    text = " ".join(run("train", "--help").output.split())
    assert "512-d" not in text and "measured best" not in text
    assert "Images per class in a P×K batch (K); not a top-k" in text


def test_disk_full_while_training_exports_the_model_is_one_line(tiny_dataset, tmp_path, monkeypatch):
    from conftest import TINY_RN
    from safetensors import torch as st

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    out = tmp_path / "run"
    r = run("train", tiny_dataset, "--out", out, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32,
            "--epochs", 1, "--p", 2, "--k", 2, "--workers", 0, "--device", "cpu", "--val-split", 0)
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]  # after the "training ..." info line, the error is one line
    assert last.startswith("error: no space left on device writing") and "model.safetensors (needs ~" in last
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind
