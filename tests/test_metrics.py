"""Tests for clipret.metrics: reference comparisons, hand-worked cases, PML parity."""

import math

import numpy as np
import pytest

from clipret import metrics as M
from clipret.retrieval.ranking import full_ranking

from reference import (
    ref_count_relevant,
    ref_map,
    ref_map_at_k,
    ref_map_at_r,
    ref_precision_at_k,
    ref_r_precision,
    ref_recall_at_k,
)


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_case(seed):
    """Random string labels and a random (shuffled) full ranking of the gallery.

    Some query classes are absent from the gallery (R == 0) and the class count
    varies so R ranges from 0 to well above the k values used.
    """
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 12))
    q = int(rng.integers(1, 40))
    g = int(rng.integers(5, 80))
    gallery = np.array([f"c{i}" for i in rng.integers(0, n_classes, g)])
    # one extra class that only queries have
    queries = np.array([f"c{i}" for i in rng.integers(0, n_classes + 1, q)])
    # bias rankings towards relevant items so AP values are not all tiny
    scores = rng.random((q, g)) + 0.5 * (gallery[None, :] == queries[:, None])
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return queries, gallery, ranked


SEEDS = list(range(40))


@pytest.mark.parametrize("seed", SEEDS)
def test_vectorised_metrics_match_reference(seed):
    queries, gallery, ranked = _random_case(seed)
    g = len(gallery)
    rel = M.rank_relevance(queries, gallery, ranked)
    n_rel = M.count_relevant(queries, gallery)
    ranked_labels = [[gallery[j] for j in row] for row in ranked]
    ql = list(queries)
    r_list = ref_count_relevant(ql, list(gallery))
    assert n_rel.tolist() == r_list

    ks = sorted({1, 2, 3, 5, 10, g // 2 or 1, g} & set(range(1, g + 1)))
    for k in ks:
        assert M.recall_at_k(rel, k, n_rel) == pytest.approx(ref_recall_at_k(ranked_labels, ql, r_list, k), nan_ok=True)
        assert M.precision_at_k(rel, k, n_rel) == pytest.approx(
            ref_precision_at_k(ranked_labels, ql, r_list, k), nan_ok=True
        )
        assert M.map_at_k(rel, n_rel, k) == pytest.approx(ref_map_at_k(ranked_labels, ql, r_list, k), nan_ok=True)
    assert M.mean_average_precision(rel, n_rel) == pytest.approx(ref_map(ranked_labels, ql, r_list), nan_ok=True)
    assert M.map_at_r(rel, n_rel) == pytest.approx(ref_map_at_r(ranked_labels, ql, r_list), nan_ok=True)
    assert M.r_precision(rel, n_rel) == pytest.approx(ref_r_precision(ranked_labels, ql, r_list), nan_ok=True)

    full = M.evaluate_full(queries, gallery, ranked, ks)
    assert full["n_queries"] == len(queries)
    assert full["n_queries_without_relevant"] == sum(r == 0 for r in r_list)
    assert full["map"] == pytest.approx(ref_map(ranked_labels, ql, r_list), nan_ok=True)
    assert full["map@r"] == pytest.approx(ref_map_at_r(ranked_labels, ql, r_list), nan_ok=True)
    assert full["r_precision"] == pytest.approx(ref_r_precision(ranked_labels, ql, r_list), nan_ok=True)
    assert full[f"map@{ks[-1]}"] == pytest.approx(ref_map_at_k(ranked_labels, ql, r_list, ks[-1]), nan_ok=True)


def test_random_cases_cover_the_interesting_regimes():
    """The seeds above really exercise k < R, k > R and R == 0."""
    saw_zero = saw_k_below_r = saw_k_above_r = False
    for seed in SEEDS:
        queries, gallery, _ = _random_case(seed)
        r = M.count_relevant(queries, gallery)
        saw_zero |= bool((r == 0).any())
        saw_k_below_r |= bool((r > 5).any())
        saw_k_above_r |= bool(((r > 0) & (r < 5)).any())
    assert saw_zero and saw_k_below_r and saw_k_above_r


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_topk_matches_reference_on_truncated_lists(seed):
    queries, gallery, ranked = _random_case(100 + seed)
    k_list = min(7, len(gallery))
    top = ranked[:, :k_list]
    n_rel = ref_count_relevant(list(queries), list(gallery))
    ranked_labels = [[gallery[j] for j in row] for row in top]
    ks = [k for k in (1, 3, 5, 7) if k <= k_list]
    out = M.evaluate_topk(queries, gallery, top, ks)
    for k in ks:
        assert out[f"recall@{k}"] == pytest.approx(ref_recall_at_k(ranked_labels, list(queries), n_rel, k), nan_ok=True)
        assert out[f"precision@{k}"] == pytest.approx(
            ref_precision_at_k(ranked_labels, list(queries), n_rel, k), nan_ok=True
        )
        assert out[f"map@{k}"] == pytest.approx(ref_map_at_k(ranked_labels, list(queries), n_rel, k), nan_ok=True)
    assert out["n_queries"] == len(queries)
    assert out["n_queries_without_relevant"] == sum(r == 0 for r in n_rel)
    # map@r / r_precision only when the lists are at least max R long
    assert ("map@r" in out) == (max(n_rel) <= k_list)
    assert ("r_precision" in out) == (max(n_rel) <= k_list)


def test_evaluate_topk_reports_full_metrics_only_when_lists_are_long_enough():
    gallery = np.array(["a", "a", "b", "c"])
    queries = np.array(["a", "b"])
    # R = [2, 1]; lists of length 2 hold every relevant item
    ranked = np.array([[0, 1], [2, 0]])
    out = M.evaluate_topk(queries, gallery, ranked, [1, 2])
    assert out["map"] == pytest.approx(1.0)
    assert out["map@r"] == pytest.approx(1.0)
    assert out["r_precision"] == pytest.approx(1.0)
    # lists of length 1 cannot hold both "a" items: no map, map@r, r_precision
    out1 = M.evaluate_topk(queries, gallery, ranked[:, :1], [1])
    assert set(out1) == {"recall@1", "precision@1", "map@1", "n_queries", "n_queries_without_relevant"}
    # long enough (K >= max R) but a relevant item fell outside the list: map unknown
    out2 = M.evaluate_topk(queries, gallery, np.array([[0, 2], [2, 3]]), [2])
    assert "map" not in out2
    assert out2["map@r"] == pytest.approx((1.0 / 2 + 1.0) / 2)  # query a: AP@R = (1/1)/2
    with pytest.raises(ValueError):
        M.evaluate_topk(queries, gallery, ranked, [3])  # k longer than the lists


# ---------------------------------------------------------------------------
# Hand-worked examples
# ---------------------------------------------------------------------------


def test_hand_example_single_query():
    # ranking [rel, not, rel] with R = 3 (one relevant item not retrieved)
    rel = np.array([[True, False, True]])
    r = np.array([3])
    # P@1 = 1/1 (rel), P@3 = 2/3 (rel) -> AP@3 = (1 + 2/3) / min(3, 3)
    assert M.map_at_k(rel, r, 3) == pytest.approx((1 + 2 / 3) / 3)
    # AP@2: only rank 1 is a hit -> 1/1 / min(2, 3) = 1/2
    assert M.map_at_k(rel, r, 2) == pytest.approx(0.5)
    # MAP@R with R = 3 looks at ranks 1..3: same sum / R
    assert M.map_at_r(rel, r) == pytest.approx((1 + 2 / 3) / 3)
    # R-precision: 2 hits in the top 3 -> 2/3
    assert M.r_precision(rel, r) == pytest.approx(2 / 3)
    assert M.precision_at_k(rel, 3) == pytest.approx(2 / 3)
    assert M.precision_at_k(rel, 2) == pytest.approx(1 / 2)
    assert M.recall_at_k(rel, 1) == 1.0
    # the full-ranking mAP refuses: only 2 of the 3 relevant items are in the list
    with pytest.raises(ValueError):
        M.mean_average_precision(rel, r)


def test_hand_example_several_queries_with_exclusion():
    rel = np.array(
        [
            [False, True, True, False],  # R = 2
            [False, False, False, True],  # R = 1
            [False, False, False, False],  # R = 0 -> excluded from every mean
        ]
    )
    r = np.array([2, 1, 0])
    # recall@1: neither included query hits at rank 1 -> 0; recall@2: only q0 -> 1/2
    assert M.recall_at_k(rel, 1, r) == 0.0
    assert M.recall_at_k(rel, 2, r) == pytest.approx(0.5)
    # without n_relevant the R == 0 row counts: 1/3
    assert M.recall_at_k(rel, 2) == pytest.approx(1 / 3)
    # precision@2: q0 1/2, q1 0 -> 1/4
    assert M.precision_at_k(rel, 2, r) == pytest.approx(0.25)
    # full AP: q0 (1/2 + 2/3)/2 = 7/12; q1 (1/4)/1 -> mean (7/12 + 1/4)/2 = 5/12
    assert M.mean_average_precision(rel, r) == pytest.approx(5 / 12)
    # AP@2: q0 P@2*1 / min(2,2) = 1/4; q1 0 -> mean 1/8
    assert M.map_at_k(rel, r, 2) == pytest.approx(1 / 8)
    # MAP@R: q0 ranks 1..2 -> (1/2)/2 = 1/4; q1 rank 1 -> 0 -> mean 1/8
    assert M.map_at_r(rel, r) == pytest.approx(1 / 8)
    # R-precision: q0 1/2, q1 0 -> 1/4
    assert M.r_precision(rel, r) == pytest.approx(0.25)
    # all queries excluded -> nan
    assert math.isnan(M.map_at_k(rel[2:], r[2:], 2))


def test_map_at_k_divides_by_min_k_r_not_by_hits():
    """The seed's bug divided by the number of hits in the top k. Not reproduced."""
    # [rel, not, not] with R = 5: one hit at rank 1.
    rel = np.array([[True, False, False]])
    r = np.array([5])
    # the seed's formula, sum P@i * rel_i / (hits in the top k), would score this list 1.0 ("perfect")
    assert M.map_at_k(rel, r, 3) == pytest.approx(1 / 3)  # 1.0 / min(k=3, R=5)
    # and when R < k the denominator is R: [rel, not, not] with R = 2 -> 1/2
    assert M.map_at_k(rel, np.array([2]), 3) == pytest.approx(0.5)


def test_inconsistent_n_relevant_is_rejected():
    rel = np.array([[True, True, False]])
    with pytest.raises(ValueError):
        M.map_at_k(rel, np.array([1]), 3)  # two hits but R says 1
    with pytest.raises(ValueError):
        M.map_at_r(np.array([[True, False]]), np.array([3]))  # list shorter than R
    with pytest.raises(ValueError):
        M.precision_at_k(rel, 4)  # k longer than the lists
    with pytest.raises(ValueError):
        M.rank_relevance(["a"], ["a", "b"], np.array([[2]]))  # index out of range


# ---------------------------------------------------------------------------
# Helpers: labels, counting, ranking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_count_relevant_matches_loop(seed):
    rng = np.random.default_rng(seed)
    gallery = rng.integers(0, 9, size=int(rng.integers(1, 300)))
    queries = rng.integers(0, 12, size=int(rng.integers(1, 100)))  # 9..11 never in gallery
    expected = [sum(1 for g in gallery if g == q) for q in queries]
    assert M.count_relevant(queries, gallery).tolist() == expected
    strq, strg = queries.astype(str), gallery.astype(str)
    assert M.count_relevant(strq, strg).tolist() == expected


def test_rank_relevance_with_string_labels():
    gallery = ["cat", "dog", "cat", "eel"]
    queries = ["cat", "eel", "fox"]
    ranked = np.array([[1, 2, 0], [3, 0, 1], [0, 1, 2]])
    expected = [[False, True, True], [True, False, False], [False, False, False]]
    assert M.rank_relevance(queries, gallery, ranked).tolist() == expected
    assert M.count_relevant(queries, gallery).tolist() == [2, 1, 0]
    with pytest.raises(ValueError):
        M.count_relevant(np.array([1, 2]), np.array(["1", "2"]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_full_ranking_matches_argsort(chunk):
    rng = np.random.default_rng(chunk)
    q = _unit(rng.normal(size=(10, 8)))
    g = _unit(rng.normal(size=(25, 8)))
    expected = np.argsort(-(q.astype(np.float64) @ g.T.astype(np.float64)), axis=1, kind="stable")
    got = full_ranking(q, g, chunk=chunk)
    assert got.shape == (10, 25)
    np.testing.assert_array_equal(got, expected)


def test_full_ranking_breaks_ties_by_lower_gallery_index():
    # Exactly representable vectors so equal cosines are bit-identical.
    half = [0.5, 0.5, 0.5, 0.5]
    e0, e1 = [1.0, 0, 0, 0], [0, 1.0, 0, 0]
    gallery = np.array([e1, half, e0, e1, half, e0, [0, 0, 0, 1.0]], dtype=np.float32)
    query = np.array([e0, half, [0, 0, 1.0, 0]], dtype=np.float32)
    got = full_ranking(query, gallery, chunk=2)  # chunk < Q
    # query e0: cos 1 for {2, 5}; 0.5 for {1, 4}; 0 for {0, 3, 6}
    assert got[0].tolist() == [2, 5, 1, 4, 0, 3, 6]
    # query half: cos 1 for {1, 4}; 0.5 for everything else
    assert got[1].tolist() == [1, 4, 0, 2, 3, 5, 6]
    # query e2: cos 0.5 for {1, 4}; 0 for the rest
    assert got[2].tolist() == [1, 4, 0, 2, 3, 5, 6]
    brute = []
    for row in query.astype(np.float64) @ gallery.T.astype(np.float64):
        brute.append(sorted(range(len(row)), key=lambda j: (-row[j], j)))
    assert got.tolist() == brute


# ---------------------------------------------------------------------------
# Parity with pytorch-metric-learning's AccuracyCalculator
# ---------------------------------------------------------------------------


def _pml_case(seed, lone_queries=False):
    rng = np.random.default_rng(seed)
    n_classes = 6
    g_labels = rng.integers(0, n_classes, size=120)
    g_labels[:n_classes] = np.arange(n_classes)  # every class present in the gallery
    q_labels = rng.integers(0, n_classes + (2 if lone_queries else 0), size=40)
    centers = rng.normal(size=(n_classes + 2, 16))
    query = _unit(centers[q_labels] + 1.2 * rng.normal(size=(40, 16)))
    gallery = _unit(centers[g_labels] + 1.2 * rng.normal(size=(120, 16)))
    return query, q_labels, gallery, g_labels


def _pml(query, q_labels, gallery, g_labels, k, include):
    torch = pytest.importorskip("torch")
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=include, avg_of_avgs=False, k=k, device=torch.device("cpu"))
    return calc.get_accuracy(query, q_labels, gallery, g_labels, ref_includes_query=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pml_accuracy_calculator(seed):
    query, q_labels, gallery, g_labels = _pml_case(seed)
    ranked = full_ranking(query, gallery, chunk=16)
    # precondition: our cosine ranking is the same as faiss's L2 kNN (no near-ties)
    from pytorch_metric_learning.utils.inference import FaissKNN
    import torch

    _, knn = FaissKNN()(torch.from_numpy(query), len(gallery), torch.from_numpy(gallery), False)
    np.testing.assert_array_equal(ranked, knn.numpy())

    ours = M.evaluate_full(q_labels, g_labels, ranked, [1, 5, 10])
    assert ours["n_queries_without_relevant"] == 0
    full = _pml(query, q_labels, gallery, g_labels, None, ("precision_at_1", "mean_average_precision"))
    at_r = _pml(
        query, q_labels, gallery, g_labels, "max_bin_count", ("r_precision", "mean_average_precision_at_r")
    )
    assert full["precision_at_1"] == pytest.approx(ours["recall@1"], abs=1e-12)
    assert full["precision_at_1"] == pytest.approx(ours["precision@1"], abs=1e-12)
    assert full["mean_average_precision"] == pytest.approx(ours["map"], abs=1e-12)
    assert at_r["r_precision"] == pytest.approx(ours["r_precision"], abs=1e-12)
    assert at_r["mean_average_precision_at_r"] == pytest.approx(ours["map@r"], abs=1e-12)
    # sanity: these are not degenerate values
    assert 0.05 < ours["map"] < 0.95 and 0.05 < ours["map@r"] < 0.95


def test_pml_excludes_queries_without_relevant_items_like_we_do():
    query, q_labels, gallery, g_labels = _pml_case(3, lone_queries=True)
    ranked = full_ranking(query, gallery)
    ours = M.evaluate_full(q_labels, g_labels, ranked, [1])
    assert ours["n_queries_without_relevant"] > 0
    full = _pml(query, q_labels, gallery, g_labels, None, ("precision_at_1", "mean_average_precision"))
    at_r = _pml(query, q_labels, gallery, g_labels, "max_bin_count", ("r_precision", "mean_average_precision_at_r"))
    assert full["precision_at_1"] == pytest.approx(ours["recall@1"], abs=1e-12)
    assert full["mean_average_precision"] == pytest.approx(ours["map"], abs=1e-12)
    assert at_r["r_precision"] == pytest.approx(ours["r_precision"], abs=1e-12)
    assert at_r["mean_average_precision_at_r"] == pytest.approx(ours["map@r"], abs=1e-12)


def test_pml_map_with_integer_k_divides_by_r_not_min_k_r():
    """Definition difference: PML's mean_average_precision with k=10 is sum_{i<=10} P@i*rel_i / R.

    Ours (map@10) divides by min(10, R); with R ~ 20 per class they differ.
    """
    query, q_labels, gallery, g_labels = _pml_case(0)
    k = 10
    ranked = full_ranking(query, gallery)
    rel = M.rank_relevance(q_labels, g_labels, ranked)
    r = M.count_relevant(q_labels, g_labels)
    assert r.min() > k
    pml = _pml(query, q_labels, gallery, g_labels, k, ("mean_average_precision",))["mean_average_precision"]
    ours = M.map_at_k(rel, r, k)
    # PML value == ours rescaled per query by min(k, R) / R
    hits = np.cumsum(rel[:, :k], axis=1)
    sums = (hits / np.arange(1, k + 1) * rel[:, :k]).sum(axis=1)
    assert pml == pytest.approx(float(np.mean(sums / r)), abs=1e-12)
    assert ours == pytest.approx(float(np.mean(sums / np.minimum(k, r))), abs=1e-12)
    assert ours > pml + 0.05


# ---------------------------------------------------------------------------
# The formulas over hit ranks (clipret.metrics.from_ranks)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_per_query_metrics_from_hit_ranks_match_reference(seed):
    queries, gallery, ranked = _random_case(200 + seed)
    ranked_labels = [[gallery[j] for j in row] for row in ranked]
    r_list = ref_count_relevant(list(queries), list(gallery))
    # hit ranks written out by hand from the labels, one query at a time
    ranks, offsets = [], [0]
    for labels_of_row, q in zip(ranked_labels, queries):
        ranks += [i + 1 for i, lab in enumerate(labels_of_row) if lab == q]
        offsets.append(len(ranks))
    ks = [k for k in (1, 2, 5) if k <= len(gallery)]
    values = M.per_query_metrics(np.array(ranks, dtype=np.int64), np.array(offsets), np.array(r_list), ks, full=True)
    out = M.summarize(values, np.array(r_list))
    ql = list(queries)
    assert out["map"] == pytest.approx(ref_map(ranked_labels, ql, r_list), nan_ok=True)
    assert out["map@r"] == pytest.approx(ref_map_at_r(ranked_labels, ql, r_list), nan_ok=True)
    assert out["r_precision"] == pytest.approx(ref_r_precision(ranked_labels, ql, r_list), nan_ok=True)
    for k in ks:
        assert out[f"recall@{k}"] == pytest.approx(ref_recall_at_k(ranked_labels, ql, r_list, k), nan_ok=True)
        assert out[f"precision@{k}"] == pytest.approx(ref_precision_at_k(ranked_labels, ql, r_list, k), nan_ok=True)
        assert out[f"map@{k}"] == pytest.approx(ref_map_at_k(ranked_labels, ql, r_list, k), nan_ok=True)
    assert out["n_queries_without_relevant"] == sum(r == 0 for r in r_list)
    # the relevance-matrix adapter produces the same hit ranks
    got_ranks, got_offsets = M.hit_ranks(M.rank_relevance(queries, gallery, ranked))
    assert got_ranks.tolist() == ranks and got_offsets.tolist() == offsets


def test_hit_ranks_hand_example():
    # one query, R = 3, relevant at ranks 2, 3, 7 of a 7-long ranking
    values = M.per_query_metrics(np.array([2, 3, 7]), np.array([0, 3]), np.array([3]), [1, 3], full=True)
    assert values["map"][0] == pytest.approx((1 / 2 + 2 / 3 + 3 / 7) / 3)
    assert values["map@r"][0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert values["r_precision"][0] == pytest.approx(2 / 3)
    assert values["recall@1"][0] == 0.0 and values["recall@3"][0] == 1.0
    assert values["precision@3"][0] == pytest.approx(2 / 3)
    assert values["map@3"][0] == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_bad_hit_ranks_are_rejected():
    with pytest.raises(ValueError, match="more relevant"):
        M.per_query_metrics(np.array([1, 2]), np.array([0, 2]), np.array([1]), [1], full=False)
    with pytest.raises(ValueError, match="increasing"):
        M.per_query_metrics(np.array([2, 2]), np.array([0, 2]), np.array([2]), [1], full=False)
    with pytest.raises(ValueError, match="increasing"):
        M.per_query_metrics(np.array([0]), np.array([0, 1]), np.array([1]), [1], full=False)
    with pytest.raises(ValueError, match="offsets"):
        M.per_query_metrics(np.array([1]), np.array([0, 2]), np.array([1]), [1], full=False)
    with pytest.raises(ValueError, match="every relevant item"):
        M.per_query_metrics(np.array([1]), np.array([0, 1]), np.array([2]), [1], full=True)
    # a new query may start at a lower rank than the previous one ended
    values = M.per_query_metrics(np.array([5, 1]), np.array([0, 1, 2]), np.array([1, 1]), [1], full=True)
    assert values["map"].tolist() == [1 / 5, 1.0]
