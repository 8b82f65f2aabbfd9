import numpy as np
import pytest

from clipret.retrieval.ranking import full_ranking, merge_topk, topk_rows
from clipret.retrieval.search import ExactSearcher
from reference import ref_topk


def _unit(n, d, seed):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_search_matches_brute_force_across_chunkings():
    g, q = _unit(300, 12, 0), _unit(23, 12, 1)
    ref_s, ref_i = ref_topk(q.tolist(), g.tolist(), 9)
    for qc, gc in [(1024, 65536), (5, 64), (1, 7)]:
        s, i = ExactSearcher(g, query_chunk=qc, gallery_chunk=gc).search(q, 9)
        np.testing.assert_array_equal(i, np.array(ref_i))
        np.testing.assert_allclose(s, np.array(ref_s), rtol=1e-5, atol=1e-6)


def test_topk_rows_partition_branch_keeps_lowest_tied_indices():
    # The case: k < G with ties at the k boundary. argpartition alone returns [0,7,8,9,3,4].
    scores = np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=np.float32)
    vals, idx = topk_rows(scores, 6)
    assert idx.tolist() == [[0, 7, 8, 9, 1, 2]]
    assert vals.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_topk_rows_equals_the_slow_reference_on_heavily_tied_rows():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(200, 40)).astype(np.float32)  # few distinct values: ties everywhere
    for k in (1, 3, 7, 39, 40, 55):
        vals, idx = topk_rows(scores, k, offset=100)
        for row, (v, i) in enumerate(zip(vals, idx)):
            want = sorted(range(40), key=lambda j: (-scores[row, j], j))[: min(k, 40)]
            assert (i - 100).tolist() == want
            assert v.tolist() == scores[row, want].tolist()


def test_chunked_search_with_ties_agrees_with_full_ranking():
    # Small integer vectors: every dot product is exact, so equal scores are bit-identical
    # whatever the BLAS blocking; chunks cut through the tied runs.
    rng = np.random.default_rng(1)
    g = rng.integers(-1, 2, size=(97, 5)).astype(np.float32)
    q = rng.integers(-1, 2, size=(9, 5)).astype(np.float32)
    want = full_ranking(q, g)[:, :13]
    for gc in (7, 10, 50, 1000):
        _, idx = ExactSearcher(g, gallery_chunk=gc, query_chunk=4).search(q, 13)
        np.testing.assert_array_equal(idx, want)


def test_k_larger_than_gallery_returns_the_whole_gallery_in_rule_order():
    g = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    q = np.array([[1, 0]], dtype=np.float32)
    s, i = ExactSearcher(g, gallery_chunk=2).search(q, 10)
    assert i.tolist() == [[0, 2, 3, 1]] and s.shape == (1, 4)


def test_merge_topk_breaks_ties_by_global_index():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[11, 13]]))
    b = (np.array([[0.95, 0.5]], np.float32), np.array([[3, 12]]))
    vals, idx = merge_topk(a, b, 3)
    assert idx.tolist() == [[3, 11, 12]]
    assert np.allclose(vals, [[0.95, 0.9, 0.5]])


def test_empty_gallery_is_a_value_error_not_an_assert():
    with pytest.raises(ValueError, match="non-empty"):
        ExactSearcher(np.zeros((0, 4), np.float32))


def test_search_streams_a_memory_mapped_gallery(tmp_path):
    g = _unit(500, 8, 3)
    np.save(tmp_path / "g.npy", g)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    q = _unit(4, 8, 4)
    s1, i1 = ExactSearcher(mm, gallery_chunk=50).search(q, 5)
    s2, i2 = ExactSearcher(g).search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
