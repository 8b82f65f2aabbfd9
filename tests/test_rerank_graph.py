"""The gallery graph from an approximate index that returns short lists (missing neighbours as row -1)."""

import numpy as np
import pytest
from reference import ref_k_reciprocal_rerank
from test_rerank import TOL, assert_same_ranking, clustered

from clipret.retrieval.pipeline import Stages, retrieve, score_function
from clipret.retrieval.rerank import build_gallery_graph, k_reciprocal_rerank, prepare_rerank
from clipret.retrieval.rerank.graph import graph_neighbors
from clipret.retrieval.search import ExactSearcher


class ShortSearcher:
    """Exact search, but like FAISS at a low nprobe: some rows come back short, padded with (-inf, -1) at the end."""

    exact = False  # the Searcher protocol: an index's approximate lists

    def __init__(self, gallery, short_every=3, missing=4):
        self.inner, self.short_every, self.missing = ExactSearcher(gallery), short_every, missing
        self.calls = 0

    def search(self, x, k):
        s, i = self.inner.search(x, k)
        self.calls += 1
        cut = min(self.missing, k) if k > 1 else 1
        rows = np.arange(len(x)) % self.short_every == self.calls % self.short_every
        s[rows, -cut:], i[rows, -cut:] = -np.inf, -1
        return s, i


def test_short_lists_are_filled_by_exact_search_and_equal_the_exact_graph():
    _, gallery = clustered(1, 120, 16, seed=31)
    exact = build_gallery_graph(gallery, k1=10, k2=6)
    short = ShortSearcher(gallery)
    got = build_gallery_graph(gallery, k1=10, k2=6, searcher=short, chunk=50)
    assert (got.indices >= 0).all() and np.isfinite(got.min_scores).all()
    np.testing.assert_array_equal(got.indices, exact.indices)
    np.testing.assert_allclose(got.scores, exact.scores, atol=1e-6)
    np.testing.assert_allclose(got.min_scores, (gallery @ gallery.T).min(axis=1), atol=1e-6)  # -x searches too
    assert 0 < got.filled < 120 and got.truncated(5).filled == got.filled


def test_reranking_through_a_short_searcher_equals_the_exact_reranking():
    """The graph build and the query side (top k, evaluation blocks, the pipeline) all run and are exact."""
    query, gallery = clustered(6, 90, 16, seed=32)
    ref = ref_k_reciprocal_rerank(query, gallery, 20, 6, 0.3)
    assert_same_ranking(ref, *k_reciprocal_rerank(query, gallery, 10, searcher=ShortSearcher(gallery)), min_isolated=0.9)
    block = prepare_rerank(query, gallery, searcher=ShortSearcher(gallery)).distance_block(0, 6)
    np.testing.assert_allclose(block, ref, atol=TOL)
    stages = Stages(rerank=True, lam=0.3)
    assert_same_ranking(ref, *retrieve(query, gallery, 10, stages, searcher=ShortSearcher(gallery)), min_isolated=0.9)
    scores = score_function(query, gallery, stages, 6, searcher=ShortSearcher(gallery))(0, 6)
    np.testing.assert_allclose(1 - scores, ref, atol=TOL)


def test_ivf_at_nprobe_one_reranks_and_its_short_rows_equal_the_exact_graph(tmp_path):
    pytest.importorskip("faiss")
    from clipret import artifacts
    from clipret.retrieval.index import open_index
    from clipret.retrieval.index.build import build_index

    query, gallery = clustered(8, 400, 8, seed=33, per=20)
    artifacts.save_embeddings(tmp_path / "g.npy", gallery, [f"g{i}" for i in range(400)], fingerprint="fp",
                              flags={"tta": False})
    build_index([tmp_path / "g.npy"], tmp_path / "g.faiss", kind="ivf", params={"nlist": 40, "nprobe": 1})
    ivf = open_index(tmp_path / "g.faiss").searcher
    m = graph_neighbors(20, 6)
    short = (ivf.search(gallery, m)[1] < 0).any(axis=1)  # about 10 vectors a cell, 21 neighbours asked
    assert short.any()
    graph = build_gallery_graph(gallery, searcher=ivf)
    exact = build_gallery_graph(gallery)
    assert graph.filled == int(short.sum()) and (graph.indices >= 0).all()
    np.testing.assert_array_equal(graph.indices[short], exact.indices[short])
    np.testing.assert_allclose(graph.scores[short], exact.scores[short], atol=1e-6)
    np.testing.assert_allclose(graph.min_scores[short], exact.min_scores[short], atol=1e-6)
    scores, idx = k_reciprocal_rerank(query, gallery, 10, searcher=ivf)
    assert idx.shape == (8, 10) and np.isfinite(scores).all() and (idx >= 0).all()
