"""Self-matches: a query that is also in the gallery is never its own hit (issue 17, item 1).

Checked against a slow reference that deletes the query's own item from the
gallery, against pytorch-metric-learning's AccuracyCalculator with
``ref_includes_query=True``, and through `clipret query` and `clipret evaluate`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipret import artifacts, evaluation
from clipret.cli import app
from clipret.retrieval.pipeline import Stages, retrieve
from clipret.retrieval.selfmatch import Recorded, drop_rows, self_matches
from reference import ref_topk
from reference_expansion import ref_qe
from reference_ranks import ref_evaluate_scores

runner = CliRunner()


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_set(n=200, classes=10, d=16, seed=0):
    """Random unit vectors with random labels: recall@1 is about 1/classes by chance."""
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((n, d))), rng.integers(0, classes, n)


def _clustered_set(n=120, classes=6, d=16, seed=1, spread=1.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d))
    return _unit(centers[labels] + spread * rng.standard_normal((n, d))), labels


def _save(path, x, labels, root=None):
    ids = [f"c{lab}/{i:04d}.jpg" for i, lab in enumerate(labels)]
    artifacts.save_embeddings(path, x, ids, fingerprint="m", root=root)
    return ids


def _labels_csv(path, ids):
    path.write_text("filename,label\n" + "".join(f"{i},{i.split('/')[0]}\n" for i in ids))
    return path


# ---------------------------------------------------------------------------
# which items are the same
# ---------------------------------------------------------------------------


def test_same_file_or_equal_content_means_the_same_row(tmp_path):
    x, labels = _random_set(20)
    ids = _save(tmp_path / "a.npy", x, labels)
    a = artifacts.load_embeddings(tmp_path / "a.npy")
    assert self_matches(a, a).tolist() == list(range(20))
    # a copy of the file (no root recorded): equal ids over equal content are still the same items
    artifacts.save_embeddings(tmp_path / "b.npy", x, ids, fingerprint="m")
    assert self_matches(a, artifacts.load_embeddings(tmp_path / "b.npy")).tolist() == list(range(20))
    # the same ids over other vectors, with no root to resolve them: nothing is known to match
    artifacts.save_embeddings(tmp_path / "c.npy", x[::-1].copy(), ids, fingerprint="m")
    assert (self_matches(a, artifacts.load_embeddings(tmp_path / "c.npy")) == -1).all()


def test_ids_resolve_under_each_manifests_root_through_symlinks(tmp_path):
    gal = tmp_path / "gallery"
    (gal / "a").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        (gal / "a" / name).write_bytes(b"x")
    qry = tmp_path / "query"
    qry.mkdir()
    os.symlink(gal / "a" / "2.jpg", qry / "two.jpg")  # a query that is gallery item a/2.jpg
    (qry / "other.jpg").write_bytes(b"y")
    q = Recorded(["two.jpg", "other.jpg"], root=qry)
    g = Recorded(["a/1.jpg", "a/2.jpg", "a/3.jpg"], root=gal)
    assert self_matches(q, g).tolist() == [1, -1]
    # the same folder under two names (a linked test/query -> test/gallery): the same id is the same file
    os.symlink(gal, tmp_path / "alias")
    assert self_matches(Recorded(["a/3.jpg", "a/9.jpg"], root=tmp_path / "alias"), g).tolist() == [2, -1]
    # no root on one side: nothing is known to match
    assert self_matches(Recorded(["a/3.jpg"]), g).tolist() == [-1]


def test_drop_rows_matches_a_loop_reference():
    rng = np.random.default_rng(4)
    idx = np.array([rng.permutation(9)[:6] for _ in range(50)], dtype=np.int64)
    idx[::7, -2:] = -1  # short lists, padded the way searchers pad them
    scores = np.where(idx >= 0, -np.sort(rng.random((50, 6)), axis=1), -np.inf).astype(np.float32)
    exclude = rng.integers(-1, 9, 50)
    for n in (3, 5, 6):
        got_s, got_i = drop_rows(scores, idx, exclude, n)
        for q in range(50):
            want = [(s, j) for s, j in zip(scores[q], idx[q]) if not (j == exclude[q] and j >= 0)][:n]
            want += [(-np.inf, -1)] * (min(n, 6) - len(want))
            assert got_i[q].tolist() == [j for _, j in want]
            assert got_s[q].tolist() == [s for s, _ in want]


# ---------------------------------------------------------------------------
# evaluation: as if each query's own item were not in the gallery
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_random_set, _clustered_set])
def test_full_ranking_without_self_matches_the_deletion_reference(make):
    x, labels = make()
    emb = artifacts.Embeddings(x, [f"{i}" for i in range(len(x))])
    label_map = {str(i): str(lab) for i, lab in enumerate(labels)}
    own = np.arange(len(x))
    own[::5] = -1  # some queries keep their own item: they must score it as a normal gallery item
    got = evaluation.evaluate_embeddings(emb, emb, label_map, [1, 5], exclude=own, max_block_bytes=4 * len(x) * 7)
    want = ref_evaluate_scores((x.astype(np.float64) @ x.T.astype(np.float64)).tolist(), labels.tolist(),
                               labels.tolist(), [1, 5], own=own.tolist())
    assert got.keys() >= want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def _pml_with_self(x, labels, include, k):
    torch = pytest.importorskip("torch")
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=include, avg_of_avgs=False, k=k, device=torch.device("cpu"))
    return calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)


@pytest.mark.parametrize("make", [_random_set, _clustered_set])
def test_query_set_as_its_own_gallery_equals_pml_ref_includes_query(make):
    x, labels = make()
    emb = artifacts.Embeddings(x, [f"{i}" for i in range(len(x))])
    label_map = {str(i): str(lab) for i, lab in enumerate(labels)}
    ours = evaluation.evaluate_embeddings(emb, emb, label_map, [1], exclude=np.arange(len(x)))
    full = _pml_with_self(x, labels, ("precision_at_1", "mean_average_precision"), None)
    at_r = _pml_with_self(x, labels, ("r_precision", "mean_average_precision_at_r"), "max_bin_count")
    assert ours["recall@1"] == pytest.approx(full["precision_at_1"], abs=1e-12)
    assert ours["map"] == pytest.approx(full["mean_average_precision"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(at_r["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(at_r["mean_average_precision_at_r"], abs=1e-12)
    with_self = evaluation.evaluate_embeddings(emb, emb, label_map, [1])
    assert with_self["recall@1"] == 1.0 and ours["recall@1"] < 0.9  # the bug: every query found itself


def test_retrieve_leaves_the_query_out_of_its_qe_neighbours_and_its_list():
    x, _ = _clustered_set(60, seed=3)
    own = np.arange(60)
    scores, idx = retrieve(x, x, 5, Stages(qe=3), exclude=own)
    assert not (idx == own[:, None]).any()
    for i in range(60):  # the reference: the gallery with row i deleted
        rest = [j for j in range(60) if j != i]
        g = x[rest].astype(np.float64)
        s, nb = ref_topk(x[i : i + 1].astype(np.float64).tolist(), g.tolist(), 3)
        q = np.array(ref_qe(x[i : i + 1].astype(np.float64).tolist(), g.tolist(), nb, s, None))
        _, top = ref_topk(q.tolist(), g.tolist(), 5)
        assert idx[i].tolist() == [rest[j] for j in top[0]]


def test_retrieve_with_k_at_the_gallery_size_pads_only_the_queries_that_lost_an_item():
    x, _ = _random_set(8)
    own = np.array([0, -1, 2, -1, 4, 5, 6, 7])
    _, idx = retrieve(x, x, 8, Stages(), exclude=own)
    assert idx.shape == (8, 8)
    for i, j in enumerate(own):
        assert (idx[i] == -1).sum() == (1 if j >= 0 else 0) and j not in idx[i][idx[i] >= 0]


# ---------------------------------------------------------------------------
# the CLI: query never lists the query itself; evaluate scores without it
# ---------------------------------------------------------------------------


@pytest.fixture()
def one_set(tmp_path):
    x, labels = _random_set()
    ids = _save(tmp_path / "x.npy", x, labels)
    return tmp_path, ids, _labels_csv(tmp_path / "labels.csv", ids)


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_the_same_file_as_query_and_gallery_is_near_chance(one_set):
    t, ids, csv = one_set
    r = _run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.npy", "--labels", csv, "--k", 1, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["recall@1"] < 0.25  # chance is about 0.1; with its own item counted it was 1.000
    assert got["self_matches_excluded"] == 200
    kept = json.loads(_run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.npy", "--labels", csv, "--k", 1,
                           "--json", "--keep-self").stdout)
    assert kept["recall@1"] == 1.0 and kept["self_matches_excluded"] == 0


def test_query_never_lists_itself_and_evaluate_of_its_results_agrees(one_set):
    t, ids, csv = one_set
    r = _run("query", t / "x.npy", "--gallery", t / "x.npy", "--k", 10, "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    assert "left out 200 self-match" in r.output
    results = json.loads((t / "r.json").read_text())
    assert all(rec["filename"] not in rec["samples"] and len(rec["samples"]) == 10 for rec in results)
    side = json.loads((t / "r.json.json").read_text())
    assert side["self_matches"]["excluded"] == 200 and side["self_matches"]["kept"] == 0
    topk = json.loads(_run("evaluate", t / "r.json", "--labels", csv, "--k", 1, 5, 10, "--json").stdout)
    full = json.loads(_run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.npy", "--labels", csv,
                           "--k", 1, 5, 10, "--json").stdout)
    for key in ("recall@1", "recall@5", "precision@10", "map@10"):
        assert topk[key] == pytest.approx(full[key], abs=1e-12), key
    assert topk["self_matches_excluded"] == 200


def test_keep_self_lists_the_query_first_and_evaluate_still_scores_without_it(one_set):
    t, ids, csv = one_set
    r = _run("query", t / "x.npy", "--gallery", t / "x.npy", "--k", 10, "--keep-self", "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    results = json.loads((t / "r.json").read_text())
    assert all(rec["samples"][0] == rec["filename"] for rec in results)  # cosine 1 with itself
    assert json.loads((t / "r.json.json").read_text())["self_matches"] == {
        "rule": "the same source file, or the same row of the same embeddings", "excluded": 0, "kept": 200}
    # the protocol still holds when scoring: the listed self-match is dropped, the rest (9 deep) scored
    topk = json.loads(_run("evaluate", t / "r.json", "--labels", csv, "--k", 1, 5, "--json").stdout)
    full = json.loads(_run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.npy", "--labels", csv,
                           "--k", 1, 5, "--json").stdout)
    assert topk["recall@1"] == pytest.approx(full["recall@1"], abs=1e-12)


def test_two_embeddings_of_one_folder_match_by_source_file(tmp_path):
    """The benchmark protocol with separate files: queries embedded from the gallery's own folder."""
    x, labels = _random_set(60)
    folder = tmp_path / "test"
    ids = _save(tmp_path / "g.npy", x, labels, root=folder)
    _save(tmp_path / "q.npy", x[:30], labels[:30], root=folder)  # a subset of the gallery's images
    csv = _labels_csv(tmp_path / "labels.csv", ids)
    r = _run("evaluate", "--query", tmp_path / "q.npy", "--gallery", tmp_path / "g.npy", "--labels", csv, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["self_matches_excluded"] == 30
    got = json.loads(r.stdout)["recall@1"]
    want = ref_evaluate_scores((x[:30].astype(np.float64) @ x.T.astype(np.float64)).tolist(), labels[:30].tolist(),
                               labels.tolist(), [1], own=list(range(30)))["recall@1"]
    assert got == pytest.approx(want, abs=1e-12)


def test_an_index_gallery_built_from_the_query_file_leaves_self_out(one_set):
    pytest.importorskip("faiss")
    t, ids, csv = one_set
    assert _run("index", t / "x.npy", "--out", t / "x.faiss").exit_code == 0
    r = _run("query", t / "x.npy", "--gallery", t / "x.faiss", "--k", 5, "--out", t / "r.json")
    assert r.exit_code == 0, r.output
    assert all(rec["filename"] not in rec["samples"] for rec in json.loads((t / "r.json").read_text()))
    ev = _run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.faiss", "--labels", csv, "--k", 1, "--json")
    assert ev.exit_code == 0, ev.output
    full = json.loads(_run("evaluate", "--query", t / "x.npy", "--gallery", t / "x.npy", "--labels", csv,
                           "--k", 1, "--json").stdout)
    assert json.loads(ev.stdout)["recall@1"] == pytest.approx(full["recall@1"], abs=1e-12)


def test_root_is_recorded_resolved_in_the_manifest(tmp_path):
    x, labels = _random_set(4)
    (tmp_path / "imgs").mkdir()
    os.symlink(tmp_path / "imgs", tmp_path / "link")
    _save(tmp_path / "a.npy", x, labels, root=tmp_path / "link")
    assert json.loads((tmp_path / "a.json").read_text())["root"] == str((tmp_path / "imgs").resolve())
    assert artifacts.load_embeddings(tmp_path / "a.npy").root == Path((tmp_path / "imgs").resolve())
