"""Query expansion (average, alpha) and DBA against loop references and hand-worked cases."""

import numpy as np
import pytest

from clipret.retrieval.expansion import alpha_qe, average_qe, dba, expand_queries
from clipret.retrieval.search import ExactSearcher

from reference import ref_topk
from reference_expansion import ref_dba, ref_qe


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _vectors(seed, n, d=6):
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def _neighbors(rng, q, g, n):
    idx = np.stack([rng.choice(g, n, replace=False) for _ in range(q)]) if n else np.zeros((q, 0), np.int64)
    return idx.astype(np.int64)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_average_qe_matches_reference(n):
    rng = np.random.default_rng(n)
    q, g = _vectors(1, 9), _vectors(2, 20)
    idx = _neighbors(rng, 9, 20, n)
    idx[0, -1] = -1  # a padded slot (faiss style) counts as no neighbour
    got = average_qe(q, g, idx)
    np.testing.assert_allclose(got, ref_qe(q.tolist(), g.tolist(), idx.tolist()), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert got.dtype == np.float32


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_alpha_qe_matches_reference(alpha):
    rng = np.random.default_rng(7)
    q, g = _vectors(3, 8), _vectors(4, 30)
    idx = _neighbors(rng, 8, 30, 5)
    scores = (q[:, None, :] * g[idx]).sum(axis=2)  # true similarities, some negative
    assert (scores < 0).any()
    got = alpha_qe(q, g, idx, scores, alpha)
    ref = ref_qe(q.tolist(), g.tolist(), idx.tolist(), scores.tolist(), alpha)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    if alpha == 0.0:  # 0 ** 0 == 1: every neighbour weighs 1, i.e. average QE
        np.testing.assert_allclose(got, average_qe(q, g, idx), atol=1e-7)


def test_qe_hand_worked():
    q = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], np.float32)
    # average of q and g0: (1, 1) / sqrt(2)
    np.testing.assert_allclose(average_qe(q, g, np.array([[0]])), [[2**-0.5, 2**-0.5]], atol=1e-7)
    # alpha-QE, alpha 2: g1 has similarity 0.6 -> weight 0.36; q + 0.36 g1 = (1.216, 0.288)
    v = np.array([1.216, 0.288])
    np.testing.assert_allclose(alpha_qe(q, g, np.array([[1]]), np.array([[0.6]]), 2.0), [v / np.linalg.norm(v)], atol=1e-6)
    # a negative similarity weighs 0 under alpha-QE: the query is unchanged
    np.testing.assert_allclose(alpha_qe(q, g, np.array([[2]]), np.array([[-1.0]]), 1.0), q)
    # the sum cancels exactly (q + g2 == 0): the query is kept instead of dividing by 0
    np.testing.assert_array_equal(average_qe(q, g, np.array([[2]])), q)


def test_qe_with_no_neighbours_is_the_identity():
    q, g = _vectors(5, 4), _vectors(6, 10)
    np.testing.assert_array_equal(average_qe(q, g, np.zeros((4, 0), np.int64)), q)
    np.testing.assert_array_equal(alpha_qe(q, g, np.zeros((4, 0), np.int64), np.zeros((4, 0)), 3.0), q)
    np.testing.assert_array_equal(expand_queries(q, g, 0), q)


def test_expand_queries_uses_the_exact_top_n():
    q, g = _vectors(8, 5), _vectors(9, 40)
    _, idx = ref_topk(q.tolist(), g.tolist(), 4)
    np.testing.assert_allclose(expand_queries(q, g, 4), ref_qe(q.tolist(), g.tolist(), idx), atol=1e-6)
    scores, idx2 = ExactSearcher(g).search(q, 4)
    np.testing.assert_allclose(expand_queries(q, g, 4, alpha=3.0), alpha_qe(q, g, idx2, scores, 3.0), atol=1e-7)


def test_qe_rejects_bad_input():
    q, g = _vectors(1, 3), _vectors(2, 5)
    with pytest.raises(ValueError, match="neighbour indices"):
        average_qe(q, g, np.array([[5], [0], [1]]))
    with pytest.raises(ValueError, match="neighbors must be"):
        average_qe(q, g, np.array([[0], [1]]))
    with pytest.raises(ValueError, match="need"):
        average_qe(q, _vectors(2, 5, d=4), np.array([[0], [0], [0]]))
    with pytest.raises(ValueError, match="alpha"):
        alpha_qe(q, g, np.array([[0], [1], [2]]), np.ones((3, 1)), -1.0)
    with pytest.raises(ValueError, match="alpha"):
        alpha_qe(q, g, np.array([[0], [1], [2]]), np.ones((3, 1)), float("nan"))
    with pytest.raises(ValueError, match="scores must match"):
        alpha_qe(q, g, np.array([[0], [1], [2]]), np.ones((3, 2)), 1.0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="int >= 0"):
            expand_queries(q, g, bad)


# ---------------------------------------------------------------------------
# DBA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 3.0])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_dba_matches_reference(n, alpha):
    g = _vectors(10 + n, 25)
    got = dba(g, n, alpha=alpha, chunk=7)
    np.testing.assert_allclose(got, ref_dba(g.tolist(), n, alpha), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_dba_counts_each_item_once_even_with_exact_duplicates():
    # integer-valued rows: dot products are exact, so duplicates tie exactly with "self"
    rng = np.random.default_rng(0)
    base = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)
    base[base.sum(axis=1) == 0, 0] = 1  # no zero rows
    g = np.concatenate([base, base[:3], base[:2]])  # rows 6..10 duplicate lower-indexed rows
    g = _unit(g)
    for n in (1, 2, 3):
        np.testing.assert_allclose(dba(g, n, chunk=4), ref_dba(g.tolist(), n), atol=1e-6)


def test_dba_edge_sizes():
    g = _vectors(20, 6)
    np.testing.assert_array_equal(dba(g, 0), g)  # identity
    every = dba(g, 100)  # n >= G: all other rows
    np.testing.assert_allclose(every, ref_dba(g.tolist(), 5), atol=1e-6)
    one = _vectors(21, 1)
    np.testing.assert_array_equal(dba(one, 3), one)


def test_dba_is_independent_of_chunking_and_writes_into_out(tmp_path):
    g = _vectors(30, 50)
    whole = dba(g, 4, alpha=2.0, chunk=4096)
    out = np.lib.format.open_memmap(tmp_path / "dba.npy", mode="w+", dtype=np.float32, shape=g.shape)
    seen = []
    ret = dba(g, 4, alpha=2.0, chunk=3, out=out, on_progress=seen.append)
    assert ret is out and sum(seen) == 50 and len(seen) == 17
    np.testing.assert_allclose(np.load(tmp_path / "dba.npy"), whole, atol=1e-6)
    for chunk in (1, 7):
        np.testing.assert_allclose(dba(g, 4, alpha=2.0, chunk=chunk), whole, atol=1e-6)


def test_dba_uses_the_given_searcher():
    g = _vectors(31, 12)

    class Padded:
        """Returns only the exact top-2 and pads the rest with -1, as faiss does."""

        def search(self, queries, k):
            s, i = ExactSearcher(g).search(queries, 2)
            pad = k - 2
            return np.pad(s, ((0, 0), (0, pad))), np.pad(i, ((0, 0), (0, pad)), constant_values=-1)

    # self is first for unit vectors, so each row averages with its single nearest other row
    np.testing.assert_allclose(dba(g, 3, searcher=Padded()), ref_dba(g.tolist(), 1), atol=1e-6)


def test_dba_rejects_bad_parameters():
    g = _vectors(40, 5)
    with pytest.raises(ValueError, match="int >= 0"):
        dba(g, -1)
    with pytest.raises(ValueError, match="alpha"):
        dba(g, 2, alpha=-0.5)
    with pytest.raises(ValueError, match="chunk"):
        dba(g, 2, chunk=0)
    with pytest.raises(ValueError, match="share memory"):
        dba(g, 2, out=g)
    with pytest.raises(ValueError, match="out must be"):
        dba(g, 2, out=np.empty((5, 6), np.float64))
    with pytest.raises(ValueError, match="non-empty"):
        dba(np.zeros((0, 6), np.float32), 2)
