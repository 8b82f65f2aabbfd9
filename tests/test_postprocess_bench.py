"""bench/fmnist_protocol.py, bench/seed_table.py and bench/postprocess.py: the real-image post-processing benchmark.

The protocol functions run on small fake idx files (class templates plus
noise, so retrieval is neither trivial nor random); the script itself runs
``--quick`` on the real Fashion-MNIST when the Debian package is installed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import fmnist_protocol as fp
import numpy as np
import pytest
from conftest import ROOT
from fashion_mnist import CLASS_NAMES, FILES
from folder_utils import _ids, _per_class, _read_labels
from postprocess import Row, candidates, combine, grid
from seed_table import mean_std, summarize
from test_fashion_mnist import _write_idx

from clipret.retrieval.pipeline import Stages

SMALL = fp.Sizes(train_per_class=6, query_per_class=3, gallery_per_class=6, size=28)


def _fake_patterns(folder: Path, train_per_class: int = 8, test_per_class: int = 10) -> Path:
    """idx files whose images are a shared base, a weak class template and strong noise (classes overlap)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    templates = rng.integers(60, 200, size=(28, 28)) + 18 * rng.standard_normal((10, 28, 28))

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        x = templates[y] + rng.normal(0, 60, size=(len(y), 28, 28))
        return np.clip(x, 0, 255).astype(np.uint8), y

    (train_x, train_y), (test_x, test_y) = split(train_per_class), split(test_per_class)
    _write_idx(folder / (FILES["train_images"] + ".gz"), train_x)
    _write_idx(folder / FILES["train_labels"], train_y)
    _write_idx(folder / FILES["test_images"], test_x)
    _write_idx(folder / FILES["test_labels"], test_y)
    return folder


@pytest.fixture(scope="module")
def fake_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_patterns(tmp_path_factory.mktemp("fake-fmnist"))


# ------------------------------------------------------------------ protocols


def test_closed_and_open_protocols(fake_src: Path, tmp_path: Path) -> None:
    closed = fp.export(tmp_path / "closed", "closed", SMALL, seed=3, src=fake_src)
    opened = fp.export(tmp_path / "open", "open", SMALL, seed=3, src=fake_src)
    assert (closed["n_train"], closed["n_query"], closed["n_gallery"]) == (60, 30, 60)
    assert (opened["n_train"], opened["n_query"], opened["n_gallery"]) == (36, 12, 24)
    train_names, test_names = set(CLASS_NAMES[:6]), set(CLASS_NAMES[6:])
    assert _per_class(_ids(tmp_path / "open" / "training")) == {c: 6 for c in train_names}
    assert _per_class(_ids(tmp_path / "open" / "test" / "query")) == {c: 3 for c in test_names}
    assert _per_class(_ids(tmp_path / "open" / "test" / "gallery")) == {c: 6 for c in test_names}
    rows = _read_labels(tmp_path / "open" / "test" / "labels.csv")[1:]
    assert {r[1] for r in rows} == test_names and len(rows) == 12 + 24
    # A class kept in both protocols gets the same images (same seed), so closed and open rows pair up.
    for split in ("training", "test/query", "test/gallery"):
        kept = [i for i in _ids(tmp_path / "closed" / split) if i.split("/")[0] in (train_names if split == "training" else test_names)]
        assert _ids(tmp_path / "open" / split) == kept


def test_export_is_done_once_and_a_partial_export_is_redone(fake_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    first = fp.export(root, "closed", SMALL, seed=0, src=fake_src)
    marker = root / "bench-done.json"
    stamp = marker.stat().st_mtime_ns
    assert fp.export(root, "closed", SMALL, seed=0, src=fake_src) == first
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten
    marker.unlink()
    (root / "training" / "stray.txt").write_text("left by a killed export")
    assert fp.export(root, "closed", SMALL, seed=0, src=fake_src) == first
    assert not (root / "training" / "stray.txt").exists()
    other = fp.export(tmp_path / "e", "closed", SMALL, seed=1, src=fake_src)
    assert _ids(tmp_path / "e" / "test" / "query") != _ids(root / "test" / "query") and other["n_query"] == 30


def _reference_metrics(q: np.ndarray, ql: list[str], g: np.ndarray, gl: list[str]) -> dict[str, float]:
    """R@1, MAP@R and mAP by plain loops: cosine, higher first, ties to the lower gallery index."""
    r1, map_r, ap = [], [], []
    for i in range(len(q)):
        scores = [float(np.dot(q[i], g[j])) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (-scores[j], j))
        rel = [gl[j] == ql[i] for j in order]
        n_rel = sum(rel)
        r1.append(float(rel[0]))
        hits, precisions = 0, []
        for rank, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                precisions.append(hits / rank)
        ap.append(sum(precisions) / n_rel)
        hits, total = 0, 0.0
        for rank, is_rel in enumerate(rel[:n_rel], start=1):
            if is_rel:
                hits += 1
                total += hits / rank
        map_r.append(total / n_rel)
    return {"recall@1": float(np.mean(r1)), "map@r": float(np.mean(map_r)), "map": float(np.mean(ap))}


def test_raw_pixels_and_evaluate_match_a_loop_reference(fake_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    fp.export(root, "closed", SMALL, seed=0, src=fake_src)
    q_npy, g_npy = fp.raw_pixels(root, tmp_path / "pixels")
    from PIL import Image

    from clipret.artifacts import load_embeddings

    labels = dict(r for r in _read_labels(root / "test" / "labels.csv")[1:])
    q, g = load_embeddings(q_npy), load_embeddings(g_npy)
    assert q.ids == _ids(root / "test" / "query") and g.dim == 28 * 28
    first = np.asarray(Image.open(root / "test" / "query" / q.ids[0]), dtype=np.float64).ravel()
    np.testing.assert_allclose(q.vectors[0], first / np.linalg.norm(first), rtol=1e-5)
    expected = _reference_metrics(np.asarray(q.vectors), [labels[i] for i in q.ids], np.asarray(g.vectors), [labels[i] for i in g.ids])
    got = fp.evaluate(q_npy, g_npy, root / "test" / "labels.csv")
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.3 < got["recall@1"] < 1.0  # the fake classes overlap: neither trivial nor random
    assert fp.time_search(q_npy, g_npy, Stages(qe=2), min_seconds=0.0) > 0


def test_evaluate_with_stages_equals_the_cli(fake_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    fp.export(root, "closed", SMALL, seed=0, src=fake_src)
    q_npy, g_npy = fp.raw_pixels(root, tmp_path / "pixels")
    row = combine([Row("+DBA 1", "dba", stages=Stages(dba=1)), Row("+α-QE 2", "qe", stages=Stages(qe=2, qe_alpha=3.0)),
                   Row("+rerank", "rerank", stages=Stages(rerank=True, k1=8, k2=3, lam=0.5))])
    api = fp.evaluate(q_npy, g_npy, root / "test" / "labels.csv", row.stages)
    r = subprocess.run([sys.executable, "-m", "clipret", "evaluate", "--query", str(q_npy), "--gallery", str(g_npy),
                        "--labels", str(root / "test" / "labels.csv"), "--k", "1", "--json", *row.cli_args()],
                       capture_output=True, text=True, check=False, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    assert {k: cli[k] for k in api} == pytest.approx(api, abs=1e-9)
    assert api != fp.evaluate(q_npy, g_npy, root / "test" / "labels.csv")  # the stages did something


def test_result_cache_skips_a_cut_line_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    cache = fp.ResultCache(path)
    cache.put({"key": "a", "v": 1})
    cache.put({"key": "b", "v": 2})
    with open(path, "a") as fh:
        fh.write('{"key": "c", "v"')  # killed mid-write
    again = fp.ResultCache(path)
    assert {r["key"] for r in again} == {"a", "b"} and again.get("c") is None
    again.put({"key": "c", "v": 3})
    final = fp.ResultCache(path)
    assert final.get("c") == {"key": "c", "v": 3} and final.get("a") == {"key": "a", "v": 1}
    assert fp.settings_key({"x": 1, "y": [2]}) == fp.settings_key({"y": [2], "x": 1}) != fp.settings_key({"x": 2, "y": [2]})


# ------------------------------------------------------------------ tables, rows


def test_mean_std_and_paired_deltas_match_statistics() -> None:
    values = [0.5, 0.7, 0.65]
    assert mean_std(values) == pytest.approx((statistics.mean(values), statistics.stdev(values)))
    assert mean_std([0.4]) == (0.4, 0.0)
    by_seed = {"plain": {0: {"map@r": 0.30}, 1: {"map@r": 0.40}, 2: {"map@r": 0.35}},
               "qe": {0: {"map@r": 0.33}, 1: {"map@r": 0.41}}}  # no seed 2 yet
    table = summarize(by_seed, "plain", ["map@r"])
    assert table["qe"]["seeds"] == [0, 1]
    assert table["qe"]["map@r"] == pytest.approx((0.37, statistics.stdev([0.33, 0.41])))
    assert table["qe"]["delta"]["map@r"] == pytest.approx((0.02, statistics.stdev([0.03, 0.01])))
    assert table["plain"]["delta"]["map@r"] == (0.0, 0.0)


def test_grid_rows_and_the_combination() -> None:
    rows = grid()
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and names[0] == "plain"
    assert {r.family for r in rows} == {"plain", "tta", "dba", "qe", "rerank"}
    assert sum(r.family == "rerank" for r in rows) == 18 and Stages(rerank=True) in [r.stages for r in rows]
    assert {r.name for r in grid(quick=True)} < set(names)
    scores = {r.name: 0.5 for r in rows} | {"plain": 0.5, "+TTA flip": 0.6, "+DBA 2": 0.55, "+α-QE 5, α=3": 0.52}
    combos = candidates(rows, scores)  # rerank never beats plain here: it stays out
    assert sorted(len(c) for c in combos) == [2, 2, 2, 3]
    full = combine(combos[-1])
    assert full.tta == "flip" and full.stages == Stages(dba=2, qe=5, qe_alpha=3.0)
    assert full.cli_args() == ["--dba", "2", "--qe", "5", "--qe-alpha", "3.0"]
    assert full.flags() == "embed --tta flip; --dba 2 --qe 5 --qe-alpha 3"


# ------------------------------------------------------------------ training, the script


def test_batch_classes_are_capped_per_protocol() -> None:
    assert fp.protocol_overrides("open", {"p": 10, "k": 4})["p"] == 6
    assert fp.protocol_overrides("closed", {"p": 8, "k": 4}) == {"p": 8, "k": 4}
    assert fp.protocol_overrides("closed", {"k": 4})["p"] == 10  # TrainConfig's default P is larger
    key = fp.run_key(fp.train_config("/data/a", "/runs/a", 0, epochs=2, workers=3))
    assert key == fp.run_key(fp.train_config("/data/b", "/runs/b", 0, epochs=2, workers=0))  # where, not what
    assert key != fp.run_key(fp.train_config("/data/a", "/runs/a", 1, epochs=2))
    assert key["model"]["vision_cfg"]["patch_size"] == 4  # the config's content, not its path
    with pytest.raises(fp.ClipretError, match="unknown training setting"):
        fp.train_config("/data", "/runs", 0, epochz=2)


@pytest.mark.slow
def test_train_and_embed_run_once(fake_src: Path, tmp_path: Path) -> None:
    settings = {"epochs": 1, "p": 10, "k": 2, "embed_dim": 16, "val_split": 0.0}
    prep = fp.prepare(tmp_path, "open", 0, fp.Sizes(6, 3, 6, 32), settings, src=fake_src)
    assert prep.train["p"] == 6  # capped at the open set's 6 training classes
    assert (prep.run / "model.safetensors").is_file() and prep.train_seconds > 0
    stamp = (prep.run / "bench-done.json").stat().st_mtime_ns
    again = fp.prepare(tmp_path, "open", 0, fp.Sizes(6, 3, 6, 32), settings, src=fake_src)
    assert again == prep and (prep.run / "bench-done.json").stat().st_mtime_ns == stamp
    # Killed after training, before the marker: the run is resumed from its checkpoint, not retrained.
    weights = (prep.run / "model.safetensors").stat().st_mtime_ns
    (prep.run / "bench-done.json").unlink()
    fp.train_run(prep.root, prep.run, 0, **fp.protocol_overrides("open", settings))
    assert json.loads((prep.run / "bench-done.json").read_text())["result"]["resumed"] is True
    assert (prep.run / "model.safetensors").stat().st_mtime_ns == weights
    out = tmp_path / "g.npy"
    seconds = fp.embed(prep.run, prep.folder("gallery"), out, tta="flip")
    assert fp.embed(prep.run, prep.folder("gallery"), out, tta="flip") == seconds  # cached, not re-embedded
    from clipret.artifacts import load_embeddings

    emb = load_embeddings(out)
    assert emb.vectors.shape == (24, 16) and emb.flags["tta"] == "flip"
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_postprocess_quick_on_real_fashion_mnist(tmp_path: Path) -> None:
    from fashion_mnist import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
    cmd = [sys.executable, str(ROOT / "bench" / "postprocess.py"), "--quick", "--seeds", "0", "1",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gives the same R@1, MAP@R and mAP" in r.stdout and "| plain |" in r.stdout and "| raw pixels |" in r.stdout
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    rows = {(x["row"], x["seed"]) for x in recs if x["kind"] == "row"}
    assert {(r.name, s) for r in grid(quick=True) for s in (0, 1)} <= rows
    assert sum(x["kind"] == "run" for x in recs) == 2 and all(0 <= x["map@r"] <= 1 for x in recs if "map@r" in x)
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("runs/*/bench-done.json")}
    assert len(done) == 2
    again = subprocess.run(cmd + ["--no-cli-check"], capture_output=True, text=True, check=False, timeout=120, env=env)
    assert again.returncode == 0 and "closed seed" not in again.stdout  # every row came from the cache
    def table(out: str) -> str:
        return out.split("## closed")[1].split("reproduce the table")[0]

    assert table(again.stdout) == table(r.stdout)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing retrained
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == len(recs)
