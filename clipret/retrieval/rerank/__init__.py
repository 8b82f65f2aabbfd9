"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and memory-bounded.

The result equals the authors' dense algorithm over all Q+G items (see
``tests/reference.py``): squared Euclidean distances of the unit vectors,
each row divided by its largest distance; k-reciprocal sets with the
round(k1/2)+1 half-set expansion and its 2/3 overlap test; V = exp(-d)
scaled to sum 1; local query expansion over the k2 nearest items (the item
itself included); Jaccard distance 1 - sum(min)/sum(max);
final = (1 - lam) * jaccard + lam * original. Gallery items rank by final
distance, ascending, ties to the lower gallery index.

How it stays small (nothing is dense in Q x G or (Q+G)^2):

1. the gallery's own neighbour lists come from a :class:`GalleryGraph`
   (built once, cacheable); one exact chunked pass of the queries over all
   items gives the queries' lists and merges the queries into the gallery
   items' lists, and every row's largest distance;
2. V and its local expansion are sparse (a few dozen entries per row);
3. the Jaccard overlap of a query is accumulated through an inverted index
   over the gallery's V. A gallery item that shares no entry with the query
   has final = (1 - lam) + lam * original, so the exact top k is the best of
   the overlapping items and the items nearest by original distance.

The method is transductive: a query batch changes the gallery items'
neighbour lists and normalisers, so a query's result depends on the other
queries in its batch, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipret.retrieval.rerank.batch import Items, RerankBatch
from clipret.retrieval.rerank.encode import Csr, encode, expand
from clipret.retrieval.rerank.graph import (
    GalleryGraph,
    build_gallery_graph,
    graph_neighbors,
    merge_queries,
)
from clipret.retrieval.rerank.knn import batch_knn, stable_order
from clipret.retrieval.search import Searcher

__all__ = [
    "GalleryGraph",
    "RerankBatch",
    "build_gallery_graph",
    "check_rerank_params",
    "k_reciprocal_rerank",
    "prepare_rerank",
    "rerank_distance_block",
    "rerank_progress_total",
]


def check_rerank_params(k1: int, k2: int, lam: float) -> None:
    """ValueError unless k1 >= 1, k2 >= 1 and 0 <= lam <= 1."""
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be an integer >= 1, got {k1}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be an integer >= 1, got {k2}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be between 0 and 1, got {lam}")


def rerank_progress_total(n_query: int, n_gallery: int, *, builds_graph: bool) -> int:
    """Sum of the counts ``k_reciprocal_rerank`` reports to ``on_progress``."""
    return (n_gallery if builds_graph else 0) + n_query + (n_query + n_gallery) + n_query


def prepare_rerank(
    query: np.ndarray,
    gallery: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    graph: GalleryGraph | None = None,
    searcher: Searcher | None = None,
    chunk: int | None = None,
    k: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> RerankBatch:
    """Encode one query batch against the gallery; then call ``.topk(k)`` or ``.distance_block(a, b)``.

    query (Q, D), gallery (G, D) float32 unit rows (gallery may be a read-only
    memory map). ``graph`` is the gallery's :class:`GalleryGraph` (built here
    with ``searcher``, or exactly, when None). ``chunk`` is the number of rows
    per block (default: blocks of about 8M scores). ``k`` is the top-k you
    will ask for (it sizes the list of nearest gallery rows kept per query).
    """
    check_rerank_params(k1, k2, lam)
    query = np.ascontiguousarray(query, dtype=np.float32)
    if gallery.dtype != np.float32:
        gallery = np.asarray(gallery, dtype=np.float32)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) and (G, D) embeddings, got {query.shape} and {gallery.shape}")
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise ValueError("re-ranking needs at least one query and one gallery item")
    nq, ng = query.shape[0], gallery.shape[0]
    m = graph_neighbors(k1, k2)
    if graph is None:
        graph = build_gallery_graph(gallery, k1=k1, k2=k2, searcher=searcher, chunk=chunk, on_progress=on_progress)
    graph.check(gallery, m)
    graph = graph.truncated(m)
    bound = graph.scores[:, m - 1] if graph.neighbors >= m else np.full(ng, -np.inf, np.float32)
    knn = batch_knn(query, gallery, m, m + max(0, int(k)), bound, chunk, on_progress)
    mx = min(m, nq + ng)
    g_nb, g_scores = merge_queries(graph, knn["pair_q"], knn["pair_g"], knn["pair_scores"], nq, mx, chunk)
    nb = np.concatenate([knn["nb"], g_nb])
    nb_scores = np.concatenate([knn["nb_scores"], g_scores])
    min_scores = np.concatenate([knn["min_scores"], np.minimum(graph.min_scores, knn["gallery_min"])])
    max_dist = np.maximum(np.float32(2) - np.float32(2) * min_scores, np.float32(0))
    items = Items(query, gallery)
    v = encode(nb, nb_scores, max_dist, k1, items.pair_scores, chunk, on_progress)
    if k2 != 1:  # as in the authors' code, k2 = 1 means no local query expansion
        v = expand(v, nb, k2, nq + ng, chunk)
    del nb, nb_scores
    v_query = Csr(v.indptr[: nq + 1].copy(), v.indices[: v.indptr[nq]].copy(), v.data[: v.indptr[nq]].copy())
    g_rows = (v.rows_of_entries()[v.indptr[nq] :] - nq).astype(np.int32)
    g_cols, g_vals = v.indices[v.indptr[nq] :], v.data[v.indptr[nq] :]
    order = stable_order(g_cols, nq + ng)
    inv_ptr = np.zeros(nq + ng + 1, dtype=np.int64)
    np.cumsum(np.bincount(g_cols, minlength=nq + ng), out=inv_ptr[1:])
    return RerankBatch(
        query, gallery, float(lam), max_dist[:nq], v_query, inv_ptr, g_rows[order], g_vals[order],
        knn["top"], knn["top_scores"],
    )


def rerank_distance_block(batch: RerankBatch, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """(stop - start, G) float32 final distances of queries start..stop-1 over the whole gallery.

    Lower is better; rank with the shared rule by passing ``-block`` as
    scores. For evaluation: hold one block at a time, never all Q x G;
    pass a reused (stop - start, G) float32 ``out`` to allocate none.
    """
    return batch.distance_block(start, stop, out)


def k_reciprocal_rerank(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    graph: GalleryGraph | None = None,
    searcher: Searcher | None = None,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the gallery for every query and keep the best ``k``.

    query (Q, D), gallery (G, D) float32 unit rows (gallery may be a read-only
    np.memmap). Returns (scores (Q, k') float32 = 1 - final distance, higher is
    better; indices (Q, k') int64 gallery rows), best first, k' = min(k, G).
    Results depend on the whole query batch (the method is transductive).
    ``on_progress`` receives counts summing to :func:`rerank_progress_total`.
    """
    batch = prepare_rerank(
        query, gallery, k1=k1, k2=k2, lam=lam, graph=graph, searcher=searcher, chunk=chunk, k=k, on_progress=on_progress
    )
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dist, idx = batch.topk(k, chunk=chunk, on_progress=on_progress)
    return (np.float32(1) - dist).astype(np.float32), idx
