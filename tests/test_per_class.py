"""Per-class metrics and the worst queries (evaluate --per-class / --worst), against loop references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import clipret
from clipret.artifacts import Embeddings, save_embeddings
from clipret.cli import app
from clipret.evaluation import evaluate_results, evaluate_scores
from clipret.evaluation.per_class import ap_name, per_class, worst_queries

runner = CliRunner()


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(seed, q=40, g=70, classes=7, noise=1.5):
    """Clustered vectors with hard queries; the last class has no gallery item (R == 0)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, 6))
    ql = rng.integers(0, classes, q)
    gl = rng.integers(0, classes - 1, g)
    query = _unit(centers[ql] + noise * rng.normal(size=(q, 6)))
    gallery = _unit(centers[gl] + noise * rng.normal(size=(g, 6)))
    return query, [f"c{c}" for c in ql], gallery, [f"c{c}" for c in gl]


def _ref_query(ranked_labels, label, r, depth_k):
    """One query, from its ranked gallery labels (best first) and R: a dict of plain numbers."""
    hits, sum_prec, first, map_r, ap_k = 0, 0.0, 0, 0.0, 0.0
    for i, lab in enumerate(ranked_labels, 1):
        if lab == label:
            hits += 1
            sum_prec += hits / i
            first = first or i
        if i == r:
            map_r = sum_prec / r
        if i == depth_k:
            ap_k = sum_prec / min(depth_k, r)
    return {"first": first, "r1": 1.0 if first == 1 else 0.0, "map": sum_prec / r, "map@r": map_r, "ap_k": ap_k}


def _ref_per_class(labels, refs):
    groups = {}
    for lab, ref in zip(labels, refs):
        if ref is not None:
            groups.setdefault(lab, []).append(ref)
    rows = [{"class": c, "n_queries": len(v), "recall@1": sum(x["r1"] for x in v) / len(v),
             "map@r": sum(x["map@r"] for x in v) / len(v)} for c, v in groups.items()]
    return sorted(rows, key=lambda row: (row["map@r"], row["recall@1"], row["class"]))


def _ref_worst(ids, labels, refs, key, n):
    rows = [(ref[key], i, lab, ref["first"]) for i, lab, ref in zip(ids, labels, refs) if ref is not None]
    return [{"id": i, "label": lab, "ap": ap, "first_hit_rank": first or None} for ap, i, lab, first in sorted(rows)[:n]]


def _compare(got, want):
    assert [r["class"] if "class" in r else r["id"] for r in got] == [r["class"] if "class" in r else r["id"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (pytest.approx(b[key]) if isinstance(b[key], float) else b[key]), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_ranking_per_query_values_per_class_and_worst_match_loops(seed):
    query, ql, gallery, gl = _data(seed)
    scores = query @ gallery.T
    codes = {c: i for i, c in enumerate(sorted(set(ql) | set(gl)))}
    q_codes, g_codes = np.array([codes[c] for c in ql]), np.array([codes[c] for c in gl])
    summary, pq = evaluate_scores([(scores, q_codes)], g_codes, [1, 5], return_per_query=True)

    refs = []
    for row, lab in zip(scores, ql):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        r = sum(1 for x in gl if x == lab)
        refs.append(_ref_query([gl[j] for j in order], lab, r, 5) if r else None)
    counted = np.array([ref is not None for ref in refs])
    assert (~counted).sum() > 0  # the data has queries with R == 0, left out of every mean
    np.testing.assert_array_equal(pq["n_relevant"] > 0, counted)
    for name, key in (("map", "map"), ("map@r", "map@r"), ("map@5", "ap_k")):
        np.testing.assert_allclose(pq[name][counted], [ref[key] for ref in refs if ref], rtol=1e-12)
    np.testing.assert_array_equal(pq["first_hit_rank"][counted], [ref["first"] for ref in refs if ref])
    # the summary evaluate prints is the mean over the counted queries of these per-query values
    assert summary["map"] == pytest.approx(np.mean([ref["map"] for ref in refs if ref]))
    assert summary["map@r"] == pytest.approx(pq["map@r"][counted].mean())
    assert summary["recall@1"] == pytest.approx(np.mean([ref["r1"] for ref in refs if ref]))

    ids = [f"q{i:02d}" for i in range(len(ql))]
    _compare(per_class(ql, pq), _ref_per_class(ql, refs))
    _compare(worst_queries(ids, ql, pq, 6), _ref_worst(ids, ql, refs, "map", 6))
    assert ap_name(pq) == "map"


def test_topk_lists_give_ap_at_k_and_rank_of_first_hit_within_the_list():
    query, ql, gallery, gl = _data(5, noise=2.5)
    gids = [f"g{j}" for j in range(len(gl))]
    labels = {**{f"q{i}": c for i, c in enumerate(ql)}, **dict(zip(gids, gl))}
    order = np.argsort(-(query @ gallery.T), axis=1, kind="stable")[:, :4]
    results = [{"filename": f"q{i}", "samples": [gids[j] for j in row]} for i, row in enumerate(order)]
    summary, pq = evaluate_results(results, labels, gids, [1, 4], return_per_query=True)
    assert ap_name(pq) == "map@4" and "map@r" not in pq  # R exceeds the list length: MAP@R is unknown
    refs = [_ref_query([gl[j] for j in row], lab, sum(1 for x in gl if x == lab), 4) if lab in gl else None
            for row, lab in zip(order, ql)]
    counted = [ref is not None for ref in refs]
    np.testing.assert_array_equal(pq["first_hit_rank"][counted], [ref["first"] for ref in refs if ref])
    assert (pq["first_hit_rank"][counted] == 0).any()  # some lists hold no hit: rank None below
    assert summary["map@4"] == pytest.approx(np.mean([ref["ap_k"] for ref in refs if ref]))
    ids = [f"q{i}" for i in range(len(ql))]
    _compare(worst_queries(ids, ql, pq, 5), _ref_worst(ids, ql, refs, "ap_k", 5))
    rows = per_class(ql, pq)
    assert all(r["map@r"] is None for r in rows)
    assert [r["recall@1"] for r in rows] == sorted(r["recall@1"] for r in rows)


def test_worst_ties_break_by_query_id_and_classes_by_name():
    pq = {"map": np.array([0.5, 0.2, 0.2, 0.9, 0.2]), "map@r": np.array([0.5, 0.2, 0.2, 0.9, 0.2]),
          "n_relevant": np.array([3, 3, 3, 3, 0]), "first_hit_rank": np.array([1, 2, 3, 1, 0])}
    got = worst_queries(["e", "d", "b", "a", "c"], ["x", "y", "y", "x", "z"], pq, 10)
    assert [w["id"] for w in got] == ["b", "d", "e", "a"]  # "c" has R == 0: no AP
    tied = {**pq, "map@r": np.array([0.5, 0.5, 0.5, 0.5, 0.0]), "first_hit_rank": np.array([1, 1, 1, 1, 0])}
    assert [r["class"] for r in per_class(["y", "x", "y", "x", "z"], tied)] == ["x", "y"]
    with pytest.raises(ValueError, match="one label per query"):
        per_class(["x"], pq)


def _save(tmp_path, name, vectors, ids):
    path = tmp_path / f"{name}.npy"
    save_embeddings(path, vectors, ids, fingerprint="fp", root=tmp_path / name)
    return path


@pytest.fixture()
def files(tmp_path):
    query, ql, gallery, gl = _data(7)
    q_ids = [f"{c}/q{i}.png" for i, c in enumerate(ql)]
    g_ids = [f"{c}/g{j}.png" for j, c in enumerate(gl)]
    return _save(tmp_path, "q", query, q_ids), _save(tmp_path, "g", gallery, g_ids), tmp_path


def test_api_and_cli_add_the_same_keys_in_both_modes(files):
    q_path, g_path, tmp = files
    res = clipret.retrieve(Embeddings.load(q_path), g_path, k=8)
    res.to_json(tmp / "results.json")
    for mode, (api, cli) in {
        "results": (lambda **kw: clipret.evaluate(res, **kw), [str(tmp / "results.json")]),
        "full": (lambda **kw: clipret.evaluate(q_path, g_path, **kw), ["--query", str(q_path), "--gallery", str(g_path)]),
    }.items():
        plain, detail = api(), api(per_class=True, worst=4)
        assert {k: v for k, v in detail.items() if k not in ("per_class", "worst")} == plain, mode
        rows = detail["per_class"]
        assert sum(r["n_queries"] for r in rows) == plain["n_queries"] - plain["n_queries_without_relevant"]
        weighted = sum(r["n_queries"] * r["recall@1"] for r in rows) / sum(r["n_queries"] for r in rows)
        assert weighted == pytest.approx(plain["recall@1"]), mode
        aps = [w["ap"] for w in detail["worst"]]
        assert len(aps) == 4 and aps == sorted(aps)
        assert all(w["label"] == w["id"].split("/")[0] for w in detail["worst"])
        r = runner.invoke(app, ["evaluate", *cli, "--per-class", "--worst", "4", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == json.loads(json.dumps(detail)), mode
    full = clipret.evaluate(q_path, g_path, per_class=True)
    weighted = sum(r["n_queries"] * r["map@r"] for r in full["per_class"]) / sum(r["n_queries"] for r in full["per_class"])
    assert weighted == pytest.approx(full["map@r"])


def test_cli_prints_the_two_tables(files):
    q_path, g_path, _ = files
    r = runner.invoke(app, ["evaluate", "--query", str(q_path), "--gallery", str(g_path), "--per-class", "--worst", "3"])
    assert r.exit_code == 0, r.output
    worst = clipret.evaluate(q_path, g_path, per_class=True, worst=3)
    assert "per class, worst first" in r.stdout and "lowest AP" in r.stdout
    assert worst["worst"][0]["id"] in r.stdout and worst["per_class"][0]["class"] in r.stdout
    bad = runner.invoke(app, ["evaluate", "--query", str(q_path), "--gallery", str(g_path), "--worst", "-1"])
    assert bad.exit_code == 2 and "--worst" in bad.output
