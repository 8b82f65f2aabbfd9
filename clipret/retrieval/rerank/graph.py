"""The gallery's neighbour graph: the part of re-ranking that does not depend on the queries.

k-reciprocal re-ranking ranks over all Q+G items together, so every gallery
item needs its nearest items and its largest distance over the queries *and*
the gallery. The gallery-to-gallery half of that is the expensive part (a
G x G search) and is the same for every query batch: :class:`GalleryGraph`
holds it, :func:`build_gallery_graph` computes it once, and
:mod:`clipret.artifacts.neighbors` caches it next to the gallery.
:func:`merge_queries` then adds one query batch to it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipret.retrieval.ranking import merge_topk, sort_neighbors
from clipret.retrieval.rerank.knn import pad_groups
from clipret.retrieval.rerank.selfknn import symmetric_knn
from clipret.artifacts.neighbors import EXACT, GalleryGraph
from clipret.retrieval.search import ExactSearcher, Searcher

__all__ = ["EXACT", "GalleryGraph", "build_gallery_graph", "graph_neighbors", "merge_queries"]


def graph_neighbors(k1: int, k2: int) -> int:
    """Neighbours each item needs: its k-reciprocal list (k1 + 1, itself included) and its k2 list."""
    return max(k1 + 1, k2)


def build_gallery_graph(
    gallery: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    searcher: Searcher | None = None,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> GalleryGraph:
    """The neighbour graph of a (G, D) float32 gallery of unit rows (may be a memory map).

    Without ``searcher`` the lists and the smallest similarities come from one
    exact chunked pass. A ``searcher`` over the same gallery (for example a
    FAISS index) supplies the lists instead, and the smallest similarity of x
    is found as minus the best score of -x. An approximate index may return
    fewer neighbours than asked (row -1: IVF at a low nprobe, HNSW after many
    removals): such a row's list and smallest similarity come from exact
    search instead, so that row equals the exact graph's (:func:`fill_short_rows`).
    ``on_progress`` receives the number of gallery rows finished (G in total).
    """
    m = min(graph_neighbors(k1, k2), gallery.shape[0])
    if searcher is None:
        idx, scores, mins = symmetric_knn(gallery, m, chunk, on_progress)
        return GalleryGraph(idx, scores, mins, int(gallery.shape[1]), EXACT)
    g = gallery.shape[0]
    idx = np.empty((g, m), dtype=np.int64)
    scores = np.empty((g, m), dtype=np.float32)
    mins = np.empty(g, dtype=np.float32)
    filled = 0
    step = chunk or 4096
    for r0 in range(0, g, step):
        rows = np.ascontiguousarray(gallery[r0 : r0 + step], dtype=np.float32)
        s, i = (np.asarray(a) for a in searcher.search(rows, m))
        far_s, far_i = (np.asarray(a) for a in searcher.search(-rows, 1))
        if s.shape != (rows.shape[0], m) or i.shape != s.shape or far_i.shape != (rows.shape[0], 1):
            raise ValueError(f"searcher returned {s.shape} scores for {rows.shape[0]} rows, k={m}")
        s, i, far, n = fill_short_rows(gallery, rows, s.astype(np.float32), i.astype(np.int64), far_s[:, 0], far_i[:, 0])
        filled += n
        scores[r0 : r0 + len(rows)], idx[r0 : r0 + len(rows)] = sort_neighbors(s, i)
        mins[r0 : r0 + len(rows)] = -far
        if on_progress is not None:
            on_progress(len(rows))
    return GalleryGraph(idx, scores, mins, int(gallery.shape[1]), type(searcher).__name__, filled)


def fill_short_rows(
    gallery: np.ndarray, rows: np.ndarray, scores: np.ndarray, idx: np.ndarray, far: np.ndarray, far_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Redo by exact search the rows an approximate searcher left short (any index -1).

    rows (n, D) float32 gallery rows; scores/idx (n, m) their neighbour lists
    from the searcher; far/far_idx (n,) the best score and row of -x. A row
    whose list holds a -1 gets its exact top m and its exact best score of -x;
    a row whose -x search found nothing gets the exact best score of -x.
    Returns (scores (n, m) float32, idx (n, m) int64, far (n,) float32, rows redone).
    """
    short = (idx < 0).any(axis=1)
    redo_far = short | (far_idx < 0)
    if not redo_far.any():
        return scores, idx, np.asarray(far, np.float32), 0
    exact = ExactSearcher(gallery)
    scores, idx, far = scores.copy(), idx.copy(), np.array(far, np.float32)
    if short.any():
        scores[short], idx[short] = exact.search(rows[short], idx.shape[1])
    far[redo_far] = exact.search(-rows[redo_far], 1)[0][:, 0]
    return scores, idx, far, int(short.sum())


def merge_queries(
    graph: GalleryGraph,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
    values: np.ndarray,
    n_query: int,
    m: int,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each gallery item's top ``m`` over queries and gallery together.

    (q_rows, g_rows, values), grouped by gallery row, are query-gallery
    similarities that reach the gallery item's m-th best gallery score (the
    only queries that can enter its list, ties included), at most ``m`` per
    gallery row. Item ids are global: queries 0..Q-1, gallery Q..Q+G-1.
    Returns (indices (G, m) int64, scores (G, m) float32), best first;
    ``chunk`` gallery rows are merged at a time.
    """
    g = graph.count
    base_i = graph.indices + n_query
    out_i = np.empty((g, m), dtype=np.int64)
    out_s = np.empty((g, m), dtype=np.float32)
    out_i[:, : graph.neighbors] = base_i[:, :m]
    out_s[:, : graph.neighbors] = graph.scores[:, :m]
    if g_rows.size == 0:
        return out_i, out_s
    hit, extra_s, extra_i = pad_groups(g_rows, q_rows, values, n_query + g)  # padding sorts after every real item
    step = chunk or 1 << 16
    for a in range(0, hit.size, step):
        h = hit[a : a + step]
        s, i = merge_topk((graph.scores[h], base_i[h]), (extra_s[a : a + step], extra_i[a : a + step]), m)
        out_s[h], out_i[h] = s, i
    return out_i, out_s
