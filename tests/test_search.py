import numpy as np

from clipret.retrieval.search import ExactSearcher, merge_topk, topk_rows
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


def test_ties_break_to_lower_index_and_k_larger_than_gallery():
    g = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    q = np.array([[1, 0]], dtype=np.float32)
    s, i = ExactSearcher(g, gallery_chunk=2).search(q, 10)
    assert i.tolist() == [[0, 2, 3, 1]] and s.shape == (1, 4)


def test_topk_rows_and_merge():
    scores = np.array([[0.1, 0.9, 0.5, 0.9]], dtype=np.float32)
    v, i = topk_rows(scores, 2, offset=10)
    assert i.tolist() == [[11, 13]] and np.allclose(v, 0.9)
    merged = merge_topk((v, i), (np.array([[0.95]], np.float32), np.array([[3]])), 2)
    assert merged[1].tolist() == [[3, 11]]


def test_search_streams_a_memory_mapped_gallery(tmp_path):
    g = _unit(500, 8, 3)
    np.save(tmp_path / "g.npy", g)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    q = _unit(4, 8, 4)
    s1, i1 = ExactSearcher(mm, gallery_chunk=50).search(q, 5)
    s2, i2 = ExactSearcher(g).search(q, 5)
    np.testing.assert_array_equal(i1, i2)
