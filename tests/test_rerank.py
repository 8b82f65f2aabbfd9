"""k-reciprocal re-ranking against the dense reference in tests/reference.py.

The reference works in float64 and the package in float32, so final
distances agree to ~1e-6. Rankings are compared item by item wherever the
reference has no other gallery item within that tolerance; where it has
(ties), the same distances must come out in the same order. Duplicate
vectors give bitwise-equal distances on both sides, and there the order
(lower gallery index first) is compared exactly.
"""

import tracemalloc

import numpy as np
import pytest
from reference import dense_k_reciprocal_rerank, ref_k_reciprocal_rerank

from clipret.artifacts.neighbors import (
    load_gallery_graph,
    neighbors_path,
    save_gallery_graph,
)
from clipret.retrieval.ranking import topk_rows
from clipret.retrieval.rerank.cache import cached_gallery_graph
from clipret.retrieval.rerank import (
    build_gallery_graph,
    k_reciprocal_rerank,
    prepare_rerank,
    rerank_distance_block,
    rerank_progress_total,
)
from clipret.retrieval.rerank.encode import Csr, expand, half_length
from clipret.retrieval.rerank.knn import lower_bound, ragged_topk, stable_order
from clipret.retrieval.search import ExactSearcher

TOL = 1e-5


def clustered(n_query, n_gallery, dim, seed, per=6, noise=0.5):
    """Unit float32 vectors around n_gallery / per random centres; queries from the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n_gallery // per), dim))

    def draw(n):
        x = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n_query), draw(n_gallery)


def lattice(n, dim, rng):
    """Unit vectors with four entries of +-1/2: every dot product is exact, so ties are everywhere."""
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        cols = rng.choice(dim, 4, replace=False)
        row[cols] = rng.choice([-0.5, 0.5], 4)
    return x


def assert_same_ranking(ref, scores, idx, min_isolated=0.0):
    """(scores, idx) from the package against the (Q, G) reference final distances."""
    q, g = ref.shape
    k = min(idx.shape[1], g)
    assert idx.shape == scores.shape == (q, k)
    isolated = 0
    for r in range(q):
        want = np.argsort(ref[r], kind="stable")[:k]
        np.testing.assert_allclose(1.0 - scores[r], ref[r, idx[r]], atol=TOL)  # score = 1 - final
        np.testing.assert_allclose(ref[r, idx[r]], ref[r, want], atol=TOL)  # the k best distances, in order
        assert len(set(idx[r].tolist())) == k
        for p, j in enumerate(want):
            if np.count_nonzero(np.abs(ref[r] - ref[r, j]) <= TOL) == 1:  # no tie: the very same item
                assert idx[r, p] == j, (r, p)
                isolated += 1
    assert isolated >= min_isolated * q * k


@pytest.mark.parametrize(
    "nq,ng,dim,k1,k2,lam,chunk",
    [
        (6, 80, 16, 20, 6, 0.3, None),  # the defaults
        (9, 120, 12, 6, 3, 0.3, 7),  # small blocks everywhere
        (4, 60, 8, 3, 2, 0.5, 1),  # odd k1 (half list round(1.5)+1 = 3), one row per block
        (5, 70, 16, 10, 30, 0.3, None),  # k2 larger than k1 + 1
    ],
)
def test_matches_the_reference_on_clustered_data(nq, ng, dim, k1, k2, lam, chunk):
    query, gallery = clustered(nq, ng, dim, seed=nq * 1000 + ng)
    ref = ref_k_reciprocal_rerank(query, gallery, k1, k2, lam)
    scores, idx = k_reciprocal_rerank(query, gallery, 15, k1=k1, k2=k2, lam=lam, chunk=chunk)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert_same_ranking(ref, scores, idx, min_isolated=0.9)


def test_dense_baseline_of_the_benchmark_matches_the_reference():
    query, gallery = clustered(7, 90, 16, seed=3)
    for k1, k2, lam in [(20, 6, 0.3), (5, 1, 0.0), (4, 3, 1.0)]:
        ref = ref_k_reciprocal_rerank(query, gallery, k1, k2, lam)
        np.testing.assert_allclose(dense_k_reciprocal_rerank(query, gallery, k1, k2, lam), ref, atol=TOL)


def test_duplicate_vectors_tie_exactly_and_rank_lower_index_first():
    query, gallery = clustered(5, 60, 12, seed=11)
    gallery[30:40] = gallery[[3, 3, 7, 12, 12, 12, 20, 25, 26, 0]]  # exact copies
    query[1] = gallery[12]  # a query equal to gallery items
    ref = ref_k_reciprocal_rerank(query, gallery)
    scores, idx = k_reciprocal_rerank(query, gallery, 20)
    assert_same_ranking(ref, scores, idx)
    want = np.argsort(ref, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(idx, want)
    ties = [(r, p) for r in range(5) for p in range(19) if ref[r, want[r, p]] == ref[r, want[r, p + 1]]]
    assert ties  # the copies do tie in the reference ...
    for r, p in ties:  # ... and in the package, where the lower gallery index comes first
        assert scores[r, p] == scores[r, p + 1] and idx[r, p] < idx[r, p + 1]


def test_lattice_vectors_with_ties_everywhere():
    rng = np.random.default_rng(0)
    for _ in range(6):
        dim, nq, ng = int(rng.choice([6, 8])), int(rng.integers(1, 6)), int(rng.integers(5, 50))
        query, gallery = lattice(nq, dim, rng), lattice(ng, dim, rng)
        k1, k2, lam = int(rng.integers(1, 22)), int(rng.integers(1, 7)), float(rng.choice([0.0, 0.3, 1.0]))
        ref = ref_k_reciprocal_rerank(query, gallery, k1, k2, lam)
        scores, idx = k_reciprocal_rerank(query, gallery, 10, k1=k1, k2=k2, lam=lam, chunk=int(rng.integers(1, 4)))
        assert_same_ranking(ref, scores, idx)


def test_gallery_smaller_than_k1():
    query, gallery = clustered(3, 5, 8, seed=5, per=2)
    ref = ref_k_reciprocal_rerank(query, gallery, k1=20, k2=6)
    scores, idx = k_reciprocal_rerank(query, gallery, 10, k1=20, k2=6)
    assert idx.shape == (3, 5)  # k' = min(k, G)
    assert_same_ranking(ref, scores, idx)


def test_single_query():
    query, gallery = clustered(1, 70, 16, seed=8)
    ref = ref_k_reciprocal_rerank(query, gallery)
    scores, idx = k_reciprocal_rerank(query, gallery, 25)
    assert_same_ranking(ref, scores, idx, min_isolated=0.9)


def test_k2_one_means_no_local_expansion():
    query, gallery = clustered(4, 60, 12, seed=9)
    ref = ref_k_reciprocal_rerank(query, gallery, k1=8, k2=1)
    assert not np.allclose(ref, ref_k_reciprocal_rerank(query, gallery, k1=8, k2=2))  # k2 does matter
    assert_same_ranking(ref, *k_reciprocal_rerank(query, gallery, 12, k1=8, k2=1), min_isolated=0.9)


def test_lambda_zero_is_pure_jaccard_and_lambda_one_is_the_plain_ranking():
    query, gallery = clustered(6, 80, 16, seed=10)
    ref0 = ref_k_reciprocal_rerank(query, gallery, lam=0.0)
    assert_same_ranking(ref0, *k_reciprocal_rerank(query, gallery, 80, lam=0.0))  # k = G: past the overlap
    scores, idx = k_reciprocal_rerank(query, gallery, 10, lam=1.0)
    _, plain = ExactSearcher(gallery).search(query, 10)
    np.testing.assert_array_equal(idx, plain)  # final = the normalised original distance
    assert_same_ranking(ref_k_reciprocal_rerank(query, gallery, lam=1.0), scores, idx, min_isolated=0.9)


def test_distance_block_equals_the_reference_and_the_topk_path():
    query, gallery = clustered(7, 90, 16, seed=12)
    ref = ref_k_reciprocal_rerank(query, gallery)
    batch = prepare_rerank(query, gallery, k=10)
    block = np.concatenate([rerank_distance_block(batch, 0, 4), rerank_distance_block(batch, 4, 7)])
    assert block.shape == (7, 90) and block.dtype == np.float32
    np.testing.assert_allclose(block, ref, atol=TOL)
    dist, idx = batch.topk(10)
    _, block_idx = topk_rows(-block, 10)
    np.testing.assert_array_equal(idx, block_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(block, idx, axis=1), atol=1e-6)


def test_topk_past_the_listed_nearest_rows_is_still_exact():
    """Ask for more than the L nearest rows kept per query: rows that cannot be proven are redone in full."""
    query, gallery = clustered(6, 90, 16, seed=27)
    for lam in (0.0, 0.3, 1.0):
        batch = prepare_rerank(query, gallery, lam=lam)  # k not given: keeps L = k1 + 1 = 21 rows
        assert batch.top.shape[1] == 21
        dist, idx = batch.topk(60)
        assert_same_ranking(ref_k_reciprocal_rerank(query, gallery, lam=lam), 1 - dist, idx)


def test_results_depend_on_the_query_batch():
    """Transductive, as in the paper: other queries change a query's result, and each batch matches the reference."""
    query, gallery = clustered(8, 80, 12, seed=13)
    alone = k_reciprocal_rerank(query[:1], gallery, 80)
    batch = k_reciprocal_rerank(query, gallery, 80)
    assert_same_ranking(ref_k_reciprocal_rerank(query[:1], gallery), *alone)
    assert_same_ranking(ref_k_reciprocal_rerank(query, gallery), *batch)
    order = np.argsort(alone[1][0])
    assert not np.allclose(alone[0][0][order], batch[0][0][np.argsort(batch[1][0])], atol=1e-4)


def test_a_prebuilt_graph_gives_identical_results():
    query, gallery = clustered(6, 90, 16, seed=14)
    graph = build_gallery_graph(gallery, k1=20, k2=6)
    for other in (query[::-1].copy(), query):  # the graph serves any batch
        fresh = k_reciprocal_rerank(other, gallery, 10)
        reused = k_reciprocal_rerank(other, gallery, 10, graph=graph)
        np.testing.assert_array_equal(reused[1], fresh[1])
        np.testing.assert_array_equal(reused[0], fresh[0])
    with pytest.raises(ValueError, match="neighbours"):
        k_reciprocal_rerank(query, gallery, 10, k1=40, graph=graph)  # built for k1 = 20
    with pytest.raises(ValueError, match="gallery"):
        k_reciprocal_rerank(query, gallery[:50], 10, graph=graph)


def test_searcher_built_graph_equals_the_exact_one():
    _, gallery = clustered(1, 120, 16, seed=15)
    exact = build_gallery_graph(gallery, k1=10, k2=6)
    via = build_gallery_graph(gallery, k1=10, k2=6, searcher=ExactSearcher(gallery, query_chunk=17), chunk=50)
    np.testing.assert_array_equal(via.indices, exact.indices)
    np.testing.assert_allclose(via.scores, exact.scores, atol=1e-6)
    np.testing.assert_allclose(via.min_scores, (gallery @ gallery.T).min(axis=1), atol=1e-6)
    assert via.method == "ExactSearcher" and exact.method == "exact" and via.filled == 0


def test_graph_cache_is_reused_and_invalidated(tmp_path):
    query, gallery = clustered(5, 70, 12, seed=16)
    path = neighbors_path(tmp_path / "gallery.npy")
    assert path.name == "gallery.npy.knn.npz"
    graph, reused = cached_gallery_graph(gallery, path, key="sha-1")
    assert not reused and path.exists()
    again, reused = cached_gallery_graph(gallery, path, key="sha-1")
    assert reused
    np.testing.assert_array_equal(again.indices, graph.indices)
    want = k_reciprocal_rerank(query, gallery, 10)
    got = k_reciprocal_rerank(query, gallery, 10, graph=again)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    mtime = path.stat().st_mtime_ns
    # a changed gallery (new key) is rebuilt and replaces the file
    changed = gallery.copy()
    changed[0] = changed[1]
    rebuilt, reused = cached_gallery_graph(changed, path, key="sha-2")
    assert not reused and path.stat().st_mtime_ns >= mtime
    np.testing.assert_array_equal(rebuilt.indices, build_gallery_graph(changed).indices)
    assert load_gallery_graph(path, key="sha-1", count=70, dim=12, neighbors=21) is None
    # more neighbours than stored, another shape: rebuilt, never reused
    assert load_gallery_graph(path, key="sha-2", count=70, dim=12, neighbors=40) is None
    assert load_gallery_graph(path, key="sha-2", count=71, dim=12, neighbors=21) is None
    assert cached_gallery_graph(changed, path, key="sha-2", k1=30)[1] is False
    # a corrupt or truncated file is rebuilt
    for junk in (b"not a zip", path.read_bytes()[:200]):
        path.write_bytes(junk)
        graph, reused = cached_gallery_graph(changed, path, key="sha-2")
        assert not reused
        assert load_gallery_graph(path, key="sha-2", count=70, dim=12, neighbors=21) is not None


def test_graph_file_holds_no_pickles_and_rejects_bad_contents(tmp_path):
    _, gallery = clustered(1, 40, 8, seed=17)
    path = tmp_path / "g.npy.knn.npz"
    graph = build_gallery_graph(gallery)
    save_gallery_graph(path, graph, key="k")
    with np.load(path, allow_pickle=False) as z:
        fields = {name: z[name] for name in z.files}
    assert fields["indices"].dtype == np.int32 and str(fields["key"]) == "k"
    fields["indices"] = fields["indices"].copy()
    fields["indices"][0, 0] = 40  # out of range
    np.savez(path, **fields)
    assert load_gallery_graph(path, key="k", count=40, dim=8, neighbors=21) is None


def test_memory_map_gallery(tmp_path):
    query, gallery = clustered(4, 60, 8, seed=18)
    np.save(tmp_path / "g.npy", gallery)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    want = k_reciprocal_rerank(query, gallery, 10)
    got = k_reciprocal_rerank(query, mapped, 10, chunk=9)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def _peak_bytes(n, chunk):
    query, gallery = clustered(n, n, 8, seed=19, per=10)
    tracemalloc.start()
    try:
        k_reciprocal_rerank(query, gallery, 10, chunk=chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_linearly_never_as_a_query_by_gallery_or_items_squared_array():
    """Triple Q and G: a Q x G or (Q+G)^2 array would grow the peak 9x; blocks of ``chunk`` rows grow it 3x."""
    small, large = _peak_bytes(500, chunk=16), _peak_bytes(1500, chunk=16)
    assert large < 4.5 * small, f"peak {small / 1e6:.1f} MB -> {large / 1e6:.1f} MB"
    assert large < 1500 * 1500 * 4  # below one float32 Q x G matrix


def test_progress_counts_add_up():
    query, gallery = clustered(5, 50, 8, seed=20)
    seen = []
    k_reciprocal_rerank(query, gallery, 5, chunk=4, on_progress=seen.append)
    assert sum(seen) == rerank_progress_total(5, 50, builds_graph=True)
    seen.clear()
    k_reciprocal_rerank(query, gallery, 5, graph=build_gallery_graph(gallery), on_progress=seen.append)
    assert sum(seen) == rerank_progress_total(5, 50, builds_graph=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"k1": 0}, "k1"), ({"k2": 0}, "k2"), ({"lam": -0.1}, "lambda"), ({"lam": 1.5}, "lambda"), ({"k1": 2.5}, "k1")],
)
def test_invalid_parameters_raise(kwargs, match):
    query, gallery = clustered(2, 20, 8, seed=21)
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(query, gallery, 5, **kwargs)


def test_invalid_shapes_raise():
    query, gallery = clustered(2, 20, 8, seed=22)
    with pytest.raises(ValueError):
        k_reciprocal_rerank(query[:, :4], gallery, 5)
    with pytest.raises(ValueError):
        k_reciprocal_rerank(query[:0], gallery, 5)
    with pytest.raises(ValueError):
        k_reciprocal_rerank(query, gallery, 0)


# --- the building blocks, against obvious versions ---------------------------------------


def test_half_length_rounds_half_to_even():
    assert [half_length(k1) for k1 in (1, 2, 3, 4, 5, 20)] == [1, 2, 3, 3, 3, 11]  # round(0.5)=0, round(2.5)=2


def test_lower_bound_is_reached_by_at_least_m_entries():
    rng = np.random.default_rng(23)
    scores = rng.integers(0, 50, size=(40, 700)).astype(np.float32)  # ties
    for m in (1, 5, 21, 200, 700):
        bound = lower_bound(scores, m)
        assert (np.count_nonzero(scores >= bound[:, None], axis=1) >= m).all()
        assert (bound <= np.sort(scores, axis=1)[:, -m]).all()
        np.testing.assert_array_equal(lower_bound(scores.T.copy(), m, axis=0), bound)  # columns alike
    assert np.isneginf(lower_bound(scores, 701)).all()


def test_ragged_topk_matches_sorting_each_row():
    rng = np.random.default_rng(24)
    rows = np.sort(rng.integers(0, 6, 200))
    ids = np.concatenate([np.sort(rng.choice(1000, np.count_nonzero(rows == r), replace=False)) for r in range(6)])
    vals = rng.integers(0, 5, 200).astype(np.float32)
    got_v, got_i = ragged_topk(rows, ids, vals, 6, 7)
    for r in range(6):
        pairs = sorted(zip(-vals[rows == r], ids[rows == r]))[:7]
        assert got_i[r].tolist() == [i for _, i in pairs]
        assert got_v[r].tolist() == [-v for v, _ in pairs]


def test_stable_order_equals_a_stable_argsort():
    rng = np.random.default_rng(25)
    for bound in (300, 70_000, 5_000_000_000):
        keys = rng.integers(0, bound, 5000)
        np.testing.assert_array_equal(stable_order(keys, bound), np.argsort(keys, kind="stable"))


def test_local_expansion_is_the_mean_of_neighbour_rows():
    rng = np.random.default_rng(26)
    dense = rng.random((30, 30)).astype(np.float32) * (rng.random((30, 30)) < 0.2)
    indptr = np.r_[0, np.cumsum(np.count_nonzero(dense, axis=1))]
    v = Csr(indptr, np.nonzero(dense)[1], dense[np.nonzero(dense)])
    nb = np.array([rng.permutation(30)[:5] for _ in range(30)])
    got = expand(v, nb, 4, 30, chunk=7)
    out = np.zeros((30, 30), np.float32)
    for i in range(30):
        out[i, got.indices[got.indptr[i] : got.indptr[i + 1]]] = got.data[got.indptr[i] : got.indptr[i + 1]]
    want = np.stack([dense[nb[i, :4]].mean(axis=0) for i in range(30)])
    np.testing.assert_allclose(out, want, atol=1e-6)
