"""The commands end to end, through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret.cli import app
from conftest import TINY_RN

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_help_lists_commands_and_examples():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("train", "embed", "query", "evaluate", "demo"):
        assert cmd in r.output
    for cmd in ("train", "embed", "query", "evaluate", "demo"):
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Example" in sub.output, cmd


def test_help_does_not_import_torch():
    code = "import sys; from clipret.cli import app; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = run("train", tiny_dataset, "--out", out, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32,
            "--epochs", 2, "--p", 3, "--k", 2, "--workers", 0, "--device", "cpu", "--val-split", 0.25,
            "--mine-from-epoch", 2)
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_model_metrics_and_checkpoint(trained_run):
    assert (trained_run / "model.safetensors").is_file() and (trained_run / "config.json").is_file()
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all("val_recall@1" in r and "val_map@r" in r for r in rows)
    assert [r["mining"] for r in rows] == [False, True]
    scores = [r["val_map@r"] for r in rows]  # an epoch is "best" when it beats every earlier one; the last best is exported
    assert [r["best"] for r in rows] == [s > max(scores[:i], default=-1.0) for i, s in enumerate(scores)]
    best_epoch = max(r["epoch"] for r in rows if r["best"])
    assert best_epoch == 1 + scores.index(max(scores))
    import torch

    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == rows[-1]["step"]
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "batch"} <= set(ckpt)


def test_embed_query_evaluate_pipeline(trained_run, tiny_dataset, tmp_path):
    g, q, res = tmp_path / "g.npy", tmp_path / "q.npy", tmp_path / "results.json"
    for folder, out in ((tiny_dataset / "test" / "gallery", g), (tiny_dataset / "test" / "query", q)):
        r = run("embed", folder, "--model", trained_run, "--out", out, "--workers", 0, "--device", "cpu")
        assert r.exit_code == 0, r.output
    gv = np.load(g)
    meta = json.loads(g.with_suffix(".json").read_text())
    assert gv.shape == (16, 512) and gv.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gv, axis=1), 1.0, rtol=1e-5)
    assert meta["ids"] == sorted(meta["ids"]) and len(meta["ids"]) == 16
    assert meta["model_fingerprint"] == json.loads((trained_run / "config.json").read_text())["fingerprint"]

    r = run("query", q, "--gallery", g, "--k", 5, "--out", res)
    assert r.exit_code == 0, r.output
    results = json.loads(res.read_text())
    assert len(results) == 8 and all(len(x["samples"]) == 5 and len(x["scores"]) == 5 for x in results)
    assert all(x["scores"] == sorted(x["scores"], reverse=True) for x in results)
    # the listed scores are the cosines of the listed ids
    qm = json.loads(q.with_suffix(".json").read_text())["ids"]
    qv = np.load(q)
    first = results[0]
    qi = qm.index(first["filename"])
    gi = meta["ids"].index(first["samples"][0])
    assert abs(float(qv[qi] @ gv[gi]) - first["scores"][0]) < 1e-5

    # query straight from an image folder gives the same lists
    res2 = tmp_path / "r2.json"
    r = run("query", tiny_dataset / "test" / "query", "--model", trained_run, "--gallery", g, "--k", 5,
            "--out", res2, "--workers", 0, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert [x["samples"] for x in json.loads(res2.read_text())] == [x["samples"] for x in results]

    labels = tiny_dataset / "test" / "labels.csv"
    r = run("evaluate", res, "--labels", labels, "--k", 1, 5, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert {"recall@1", "recall@5", "precision@5", "map@5", "n_queries"} <= set(m) and m["n_queries"] == 8
    assert 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0

    r = run("evaluate", "--query", q, "--gallery", g, "--labels", labels, "--k", 1, "--k", 5, "--json")
    assert r.exit_code == 0, r.output
    full = json.loads(r.stdout)
    assert {"map", "map@r", "r_precision"} <= set(full)
    # query (FAISS's kernel when installed) and evaluate (numpy) round dot products differently in the last
    # bits, by up to `err`; this barely trained model maps everything to cosines of ~0.99999, so a query
    # whose two best scores are within 2·err may rank them either way. Any other query must get the same
    # top-1 from both. Exact agreement is checked in test_evaluation.py.
    sim = qv @ gv.T
    err = max(abs(float(sim[qm.index(x["filename"]), meta["ids"].index(i)]) - s) for x in results
              for i, s in zip(x["samples"], x["scores"]))
    top2 = np.sort(sim, axis=1)[:, ::-1][:, :2]
    clear = top2[:, 0] - top2[:, 1] > 2 * err
    assert clear.any(), (top2, err)  # else nothing below can fail
    top1 = {x["filename"]: x["samples"][0] for x in results}
    assert all(top1[qm[n]] == meta["ids"][int(np.argmax(sim[n]))] for n in np.flatnonzero(clear))
    hits = [top1[x["filename"]].split("/")[0] == x["filename"].split("/")[0] for x in results]
    assert m["recall@1"] == pytest.approx(np.mean(hits))  # results.json scored as listed
    assert abs(full["recall@1"] - m["recall@1"]) * len(qv) <= np.count_nonzero(~clear)

    r = run("evaluate", "--query", q, "--gallery", g)  # labels from class subfolders
    assert r.exit_code == 0 and "recall@1" in r.stdout


def test_toml_config_and_flag_override(tiny_dataset, tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "{TINY_RN.as_posix()}"\npretrained = "none"\nimage-size = 32\nepochs = 1\np = 2\nk = 2\n'
                    'workers = 0\ndevice = "cpu"\nval_split = 0.0\nembed_dim = 32\n'
                    'circle-m = 0.3\ncircle_gamma = 64.0\nminer-epsilon = 0.2\ngrad-clip = 2.0\n')
    out = tmp_path / "run"
    r = run("train", tiny_dataset, "--config", toml, "--embed-dim", 16, "--out", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["model"]
    assert cfg["embed_dim"] == 16  # the flag beat the file
    assert cfg["preprocess"]["size"] == 32  # the file beat the default
    import torch

    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (saved["circle_m"], saved["circle_gamma"], saved["miner_epsilon"], saved["grad_clip"]) == (0.3, 64.0, 0.2, 2.0)
    toml.write_text("epochz = 3\n")
    r = run("train", tiny_dataset, "--config", toml, "--out", out)
    assert r.exit_code == 2 and "unknown setting(s) epochz" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["query", "missing.npy", "--gallery", "missing.npy"], "not found"),
        (["evaluate"], "nothing to score"),
        (["train", "/nonexistent/root", "--model", str(TINY_RN), "--pretrained", "none"], "not found"),
        (["embed", "/nonexistent", "--model", str(TINY_RN), "--pretrained", "none", "--out", "x.npy"], "folder not found"),
        # train settings are checked before the images (the root here does not exist) and before any download
        (["train", "/nonexistent/root", "--model", str(TINY_RN), "--pretrained", "none", "--pool", "cls"], "--pool cls needs a ViT"),
        (["train", "/nonexistent/root", "--model", str(TINY_RN), "--amp", "fp8"], "unknown --amp"),
        (["train", "/nonexistent/root", "--model", str(TINY_RN), "--device", "tpu"], "unknown --device"),
        (["train", "--resume", "/nonexistent/run"], "nothing to resume"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    r = run(*args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("option,value", [("--pool", "foo"), ("--gem-input", "relu")])
def test_train_choices_are_checked_by_the_parser(option, value):
    r = run("train", "/nonexistent/root", "--model", TINY_RN, option, value)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"Invalid value for '{option}'" in r.output and "not found" not in r.output


def test_query_k_must_be_positive_and_dims_must_match(tmp_path):
    from clipret import artifacts

    artifacts.save_embeddings(tmp_path / "a.npy", np.eye(3, dtype=np.float32), ["a", "b", "c"], fingerprint="f1")
    artifacts.save_embeddings(tmp_path / "b.npy", np.eye(4, dtype=np.float32), list("abcd"), fingerprint="f1")
    artifacts.save_embeddings(tmp_path / "c.npy", np.eye(3, dtype=np.float32), ["a", "b", "c"], fingerprint="f2")
    r = run("query", tmp_path / "a.npy", "--gallery", tmp_path / "a.npy", "--k", 0)
    assert r.exit_code == 2 and "--k must be positive" in r.output
    r = run("query", tmp_path / "a.npy", "--gallery", tmp_path / "b.npy")
    assert r.exit_code == 2 and "query dim 3 != gallery dim 4" in r.output
    r = run("query", tmp_path / "a.npy", "--gallery", tmp_path / "c.npy", "--out", tmp_path / "r.json")
    assert r.exit_code == 2 and "different models" in r.output and not (tmp_path / "r.json").exists()
    r = run("query", tmp_path / "a.npy", "--gallery", tmp_path / "c.npy", "--out", tmp_path / "r.json", "--allow-mismatch")
    assert r.exit_code == 0 and (tmp_path / "r.json").exists() and "warning" in r.output


def test_offline_pretrained_tag_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from clipret.model import backbone

    monkeypatch.setattr(backbone, "_cached", lambda cfg: False)
    (tmp_path / "a.png").write_bytes(b"")
    r = run("embed", tmp_path, "--model", "ViT-B-32", "--pretrained", "openai", "--out", tmp_path / "x.npy")
    assert r.exit_code == 2
    assert "--pretrained none" in r.output and "local weights file" in r.output


def test_more_bad_artifacts_are_one_line_exit_2(tmp_path):
    from clipret import artifacts

    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "emptymodel").mkdir()
    r = run("embed", tmp_path / "imgs", "--model", tmp_path / "emptymodel", "--out", tmp_path / "x.npy")
    assert r.exit_code == 2 and "no config.json" in r.output
    artifacts.save_embeddings(tmp_path / "q.npy", np.eye(2, dtype=np.float32), ["a", "b"], fingerprint=None)
    (tmp_path / "labels.csv").write_text("a,x\n")
    r = run("evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "q.npy", "--labels", tmp_path / "labels.csv")
    assert r.exit_code == 2 and "have no label" in r.output


def test_debug_shows_the_traceback(tmp_path):
    r = run("--debug", "query", tmp_path / "missing.npy", "--gallery", tmp_path / "missing.npy")
    assert r.exit_code != 0 and r.exc_info is not None
    from clipret.errors import ClipretError

    assert isinstance(r.exception, ClipretError)


def test_cli_reference_doc_is_current(tmp_path):
    """docs/cli.md is generated from the app (the failure message says how to regenerate it)."""
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "clipret.cli", "utils", "docs", "--name", "clipret",
                    "--title", "clipret command-line reference", "--output", str(out)], check=True, capture_output=True)
    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert out.read_text() == doc.read_text(), (
        "docs/cli.md is stale: python -m typer clipret.cli utils docs --name clipret "
        "--title 'clipret command-line reference' --output docs/cli.md"
    )


def test_query_and_evaluate_on_npy_never_import_torch(tmp_path):
    from clipret import artifacts

    v = np.eye(4, dtype=np.float32)
    artifacts.save_embeddings(tmp_path / "g.npy", v, ["a/1", "a/2", "b/1", "b/2"], fingerprint="f")
    artifacts.save_embeddings(tmp_path / "q.npy", v[:2], ["a/q", "b/q"], fingerprint="f")
    code = (
        "import sys\n"
        "from clipret.cli import app\n"
        "for args in (['query', 'q.npy', '--gallery', 'g.npy', '--k', '2', '--out', 'r.json'],\n"
        "             ['evaluate', 'r.json', '--gallery', 'g.npy', '--k', '1', '--json'],\n"
        "             ['evaluate', '--query', 'q.npy', '--gallery', 'g.npy', '--json']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no torch")


@pytest.mark.slow
def test_demo_runs_offline_and_beats_chance(tmp_path):
    r = run("demo", "--dir", tmp_path / "demo", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout[r.stdout.index("{"):])
    assert m["n_queries"] == 96 and m["chance_recall@1"] == pytest.approx(1 / 8)
    assert m["recall@1"] >= 3 * m["chance_recall@1"], m  # measured 0.58-0.68 over seeds 0-2
    assert (tmp_path / "demo" / "results.json").is_file() and (tmp_path / "demo" / "run" / "model.safetensors").is_file()
    r = run("demo", "--dir", tmp_path / "demo", "--epochs", 1, "--json")  # re-running in the same folder works
    assert r.exit_code == 0, r.output


def test_the_design_cards_query_line_works_with_a_trained_run(trained_run, tiny_dataset, tmp_path):
    """`clipret query FOLDER --model RUN --gallery g.npy --tta --rerank --qe 3`, a bare --tta meaning flip."""
    g = tmp_path / "g.npy"
    r = run("embed", tiny_dataset / "test" / "gallery", "--model", trained_run, "--out", g, "--tta", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(g.with_suffix(".json").read_text())["flags"]["tta"] == "flip"
    res = tmp_path / "r.json"
    r = run("query", tiny_dataset / "test" / "query", "--model", trained_run, "--gallery", g, "--tta", "--rerank",
            "--qe", 3, "--k", 5, "--out", res, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "symmetric" not in r.output  # both sides used flip
    side = json.loads((tmp_path / "r.json.json").read_text())
    assert side["query"]["flags"]["tta"] == "flip"
    assert set(side["stages"]) == {"qe", "rerank"} and side["stages"]["qe"]["n"] == 3
    assert len(json.loads(res.read_text())) == 8
    q = tmp_path / "q.npy"
    assert run("embed", tiny_dataset / "test" / "query", "--model", trained_run, "--out", q, "--tta", "flip",
               "--device", "cpu").exit_code == 0
    r = run("query", q, "--gallery", g, "--rerank", "--qe", 3, "--out", tmp_path / "r2.json")
    assert r.exit_code == 0, r.output
    r = run("query", q, "--gallery", g, "--tta", "--rerank", "--qe", 3)
    assert r.exit_code == 2 and "pass --tta to the `clipret embed`" in r.output
