"""Streaming full-ranking evaluation: rank counting, chunking, pluggable scores, hard and tied data."""

import numpy as np
import pytest

from clipret import metrics
from clipret.artifacts import Embeddings, load_embeddings, save_embeddings
from clipret.errors import ClipretError
from clipret.evaluation import (
    RankCounter,
    chunk_rows,
    evaluate_embeddings,
    evaluate_results,
    evaluate_scores,
    relevant_ranks,
    score_chunks,
)
from clipret.retrieval.ranking import full_ranking

from reference_ranks import ref_evaluate_scores, ref_rank_of

KS = [1, 3, 10]


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(seed=0, q=37, g=90, classes=6):
    rng = np.random.default_rng(seed)
    qids = [f"q{i}" for i in range(q)]
    gids = [f"g{i}" for i in range(g)]
    labels = {i: str(rng.integers(classes)) for i in qids + gids}
    return Embeddings(_unit(rng.normal(size=(q, 8))), qids), Embeddings(_unit(rng.normal(size=(g, 8))), gids), labels


def _clustered(seed, q, g, classes, d, noise):
    """Clustered unit vectors; large ``noise`` puts relevant items deep in the ranking."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    ql, gl = rng.integers(0, classes, q), rng.integers(0, classes, g)
    query = _unit(centers[ql] + noise * rng.normal(size=(q, d)))
    gallery = _unit(centers[gl] + noise * rng.normal(size=(g, d)))
    return query, ql, gallery, gl


def _as_embeddings(query, ql, gallery, gl):
    qids = [f"q{i}" for i in range(len(query))]
    gids = [f"g{i}" for i in range(len(gallery))]
    labels = {**{i: f"c{c}" for i, c in zip(qids, ql)}, **{i: f"c{c}" for i, c in zip(gids, gl)}}
    return Embeddings(query, qids), Embeddings(gallery, gids), labels


def _close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12, nan_ok=True), key


# ---------------------------------------------------------------------------
# Rank counting (one row)
# ---------------------------------------------------------------------------


def _rows(rng, g):
    yield rng.standard_normal(g).astype(np.float32)
    yield rng.integers(-3, 4, g).astype(np.float32)  # heavy exact ties
    yield (rng.integers(-40, 40, g) / 8).astype(np.float64)
    tied = rng.standard_normal(g).astype(np.float32)
    tied[rng.random(g) < 0.3] = 0.0
    tied[rng.random(g) < 0.3] = -0.0  # equal to +0.0
    yield tied


@pytest.mark.parametrize("direct_max", [0, 3, 10**9])
@pytest.mark.parametrize("seed", range(6))
def test_rank_counter_matches_the_loop_reference(seed, direct_max):
    rng = np.random.default_rng(seed)
    for g in (1, 2, 7, int(rng.integers(20, 400))):
        for row in _rows(rng, g):
            for r in {0, 1, min(g, 5), g // 2, g}:
                relevant = np.sort(rng.choice(g, r, replace=False)).astype(np.int64)
                got = RankCounter(g, direct_max=direct_max).ranks(row, relevant)
                vals = row.tolist()
                assert got.tolist() == [ref_rank_of(vals, j) for j in relevant.tolist()]


def test_rank_counter_agrees_with_full_ranking_on_a_large_row():
    rng = np.random.default_rng(5)
    g = 50_000
    row = np.round(rng.standard_normal(g), 2).astype(np.float32)  # ~800 distinct values: many ties
    inverse = np.empty(g, dtype=np.int64)
    inverse[np.argsort(-row, kind="stable")] = np.arange(g)
    counter = RankCounter(g)
    for r in (20, 500, 20_000):
        relevant = np.sort(rng.choice(g, r, replace=False))
        np.testing.assert_array_equal(counter.ranks(row, relevant), inverse[relevant])


def test_rank_counter_rejects_non_finite_scores_and_bad_shapes():
    for direct_max in (0, 10):
        counter = RankCounter(4, direct_max=direct_max)
        with pytest.raises(ValueError, match="finite"):
            counter.ranks(np.array([0.1, np.nan, 0.3, 0.2], np.float32), np.array([0, 1]))
        with pytest.raises(ValueError, match="finite"):
            counter.ranks(np.array([0.1, np.inf, 0.3, 0.2], np.float32), np.array([0, 2]))
    with pytest.raises(ValueError):
        RankCounter(4).ranks(np.zeros(5, np.float32), np.array([0]))
    with pytest.raises(ValueError):
        RankCounter(0)


def test_relevant_ranks_hand_example():
    # scores:        0    1    2    3    4
    row = np.array([0.5, 0.9, 0.5, 0.1, 0.9], dtype=np.float32)
    # ranking by the rule: 1 (0.9), 4 (0.9, higher index), 0 (0.5), 2, 3
    assert relevant_ranks(row, np.array([0, 2, 4])).tolist() == [2, 3, 1]


# ---------------------------------------------------------------------------
# Whole evaluations
# ---------------------------------------------------------------------------


def test_full_ranking_evaluation_matches_the_loop_reference_and_evaluate_full():
    query, ql, gallery, gl = _clustered(0, q=25, g=120, classes=7, d=8, noise=1.0)
    ql[:3] = 99  # a class no gallery item has: R == 0
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    got = evaluate_embeddings(q, g, labels, KS)
    scores = (query @ gallery.T).tolist()
    ref = ref_evaluate_scores(scores, ql.tolist(), gl.tolist(), KS)
    assert got["n_queries"] == 25 and got["n_queries_without_relevant"] == 3
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    _close(got, metrics.evaluate_full(ql, gl, full_ranking(query, gallery), KS))


@pytest.mark.parametrize("seed", [0, 1])
def test_hard_data_with_relevant_items_deep_in_the_ranking(seed):
    query, ql, gallery, gl = _clustered(seed, q=60, g=3000, classes=30, d=16, noise=2.5)
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    got = evaluate_embeddings(q, g, labels, KS, max_block_bytes=7 * 3000 * 4, workers=2)
    assert 0.04 < got["map"] < 0.25, got["map"]  # hard: relevant items spread over the ranking
    _close(got, metrics.evaluate_full(ql, gl, full_ranking(query, gallery), KS))


def test_heavy_exact_ties_follow_the_ranking_rule():
    rng = np.random.default_rng(3)
    # small integer vectors: dot products are exact, so equal scores are common
    gallery = rng.integers(-1, 2, size=(400, 4)).astype(np.float32)
    query = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
    gl, ql = rng.integers(0, 5, 400), rng.integers(0, 5, 30)
    scores = query @ gallery.T
    assert np.mean([len(np.unique(r)) for r in scores]) < 12  # at most 9 distinct values a row
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    got = evaluate_embeddings(q, g, labels, KS, max_block_bytes=4 * 400 * 4)
    _close(got, metrics.evaluate_full(ql, gl, full_ranking(query, gallery), KS))
    ref = ref_evaluate_scores(scores.tolist(), ql.tolist(), gl.tolist(), KS)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_results_do_not_depend_on_chunking_or_threads():
    query, ql, gallery, gl = _clustered(2, q=41, g=500, classes=9, d=8, noise=1.5)
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    base = evaluate_embeddings(q, g, labels, KS, workers=1)
    for block, workers in [(500 * 4, 1), (3 * 500 * 4, 2), (500 * 4 * 41, 3), (1, 2)]:
        assert evaluate_embeddings(q, g, labels, KS, max_block_bytes=block, workers=workers) == base


def test_pluggable_score_function_gets_bounded_chunks():
    rng = np.random.default_rng(4)
    query, ql, gallery, gl = _clustered(4, q=23, g=60, classes=4, d=8, noise=1.0)
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    final = rng.standard_normal((23, 60))  # float64 "re-ranked" scores, unrelated to the vectors
    calls = []

    def score_fn(q0, q1):
        calls.append((q0, q1))
        return final[q0:q1]

    rows = chunk_rows(60, 5 * 60 * 4)
    assert rows == 5
    seen = []
    got = evaluate_embeddings(q, g, labels, KS, score_fn=score_fn, max_block_bytes=5 * 60 * 4, on_progress=seen.append)
    assert calls == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert seen == [5, 5, 5, 5, 3]
    ranked = np.argsort(-final, axis=1, kind="stable")
    _close(got, metrics.evaluate_full(ql, gl, ranked, KS))


def test_evaluate_scores_directly_and_its_errors():
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((10, 30)).astype(np.float32)
    qc, gc = rng.integers(0, 3, 10), rng.integers(0, 3, 30)
    got = evaluate_scores(score_chunks(lambda a, b: scores[a:b], qc, 4), gc, [1, 5])
    _close(got, metrics.evaluate_full(qc, gc, np.argsort(-scores, axis=1, kind="stable"), [1, 5]))
    with pytest.raises(ValueError, match="score block"):
        evaluate_scores([(scores[:, :29], qc)], gc, [1])
    with pytest.raises(ValueError, match="k must be"):
        evaluate_scores([(scores, qc)], gc, [31])
    bad = scores.copy()
    bad[2, 7] = np.nan
    with pytest.raises(ValueError, match="finite"):
        evaluate_scores([(bad, np.zeros(10, int))], np.zeros(30, int), [1])


def test_memory_mapped_gallery(tmp_path):
    query, ql, gallery, gl = _clustered(7, q=12, g=200, classes=5, d=8, noise=1.0)
    q, g, labels = _as_embeddings(query, ql, gallery, gl)
    save_embeddings(tmp_path / "g.npy", gallery, g.ids, fingerprint=None)
    mapped = load_embeddings(tmp_path / "g.npy")
    assert isinstance(mapped.vectors, np.memmap)
    assert evaluate_embeddings(q, mapped, labels, KS, max_block_bytes=3 * 200 * 4) == evaluate_embeddings(q, g, labels, KS)


def test_ks_above_the_gallery_size_are_dropped():
    q, g, labels = _data()
    out = evaluate_embeddings(q, g, labels, [1, 5, 1000])
    assert "recall@5" in out and "recall@1000" not in out


# ---------------------------------------------------------------------------
# results.json mode
# ---------------------------------------------------------------------------


def test_results_mode_equals_full_ranking_on_shared_metrics():
    q, g, labels = _data(seed=3)
    ranked = full_ranking(q.vectors, g.vectors)
    results = [{"filename": qid, "samples": [g.ids[j] for j in row[:10]]} for qid, row in zip(q.ids, ranked)]
    top = evaluate_results(results, labels, g.ids, [1, 5, 10])
    full = evaluate_embeddings(q, g, labels, [1, 5, 10])
    for key in ("recall@1", "precision@5", "map@10", "recall@10"):
        assert top[key] == pytest.approx(full[key]), key


def test_results_with_unknown_ids_or_bad_k_are_user_errors():
    q, g, labels = _data()
    results = [{"filename": "q0", "samples": ["nope"]}]
    with pytest.raises(ClipretError, match="not in the gallery"):
        evaluate_results(results, labels, g.ids, [1])
    with pytest.raises(ClipretError, match="positive"):
        evaluate_results([{"filename": "q0", "samples": ["g1"]}], labels, g.ids, [0])
    with pytest.raises(ClipretError, match="have no label"):
        evaluate_results([{"filename": "zz", "samples": ["g1"]}], labels, g.ids, [1])


def test_rank_counter_widens_float16_and_refuses_other_dtypes():
    row16 = np.array([0.5, 0.25, 0.5, 1.0], dtype=np.float16)
    assert RankCounter(4).ranks(row16, np.array([0, 2])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="float32 or float64"):
        RankCounter(4).ranks(np.array([3, 1, 2, 0]), np.array([0]))
