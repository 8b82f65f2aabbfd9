"""The one ranking rule every command shares, written once.

**Higher score first; equal scores keep the lower gallery index first.**

``query`` (top-k lists), ``evaluate`` (full rankings and the ranks of
relevant items) and the post-processing stages all rank through the
functions here, so they cannot disagree about ties. For distances, where
lower is better, pass the negated distance as the score.
"""

from __future__ import annotations

import numpy as np

__all__ = ["topk_rows", "merge_topk", "full_ranking", "sort_neighbors"]


def topk_rows(scores: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of each row of (Q, G) ``scores``, by the ranking rule.

    Returns (values (Q, k') float, column indices + ``offset`` (Q, k') int64)
    with k' = min(k, G), best first. For k < G this selects with
    ``argpartition`` (O(G) per row) and then repairs the rows whose k-th value
    is tied with values outside the partition, so the kept tied columns are
    always the lowest-indexed ones.
    """
    q, g = scores.shape
    k = min(int(k), g)
    if k <= 0:
        return np.zeros((q, 0), scores.dtype), np.zeros((q, 0), np.int64)
    if k < g:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(scores, part, axis=1)
        kth = vals.min(axis=1)  # the k-th best value of each row
        inside = np.count_nonzero(vals == kth[:, None], axis=1)
        overall = np.count_nonzero(scores == kth[:, None], axis=1)
        for r in np.flatnonzero(overall > inside):  # rare: a tie straddles the k boundary
            above = np.flatnonzero(scores[r] > kth[r])
            tied = np.flatnonzero(scores[r] == kth[r])[: k - above.size]
            part[r] = np.concatenate([above, tied])
            vals[r] = scores[r, part[r]]
    else:
        part = np.broadcast_to(np.arange(g), scores.shape).copy()
        vals = scores.copy()
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(vals, order, axis=1), idx.astype(np.int64) + offset


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (scores (Q, ka), indices (Q, ka)) neighbour lists of the same queries; keep the best ``k``.

    Indices are global gallery indices, so the tie rule holds across chunks.
    """
    vals = np.concatenate([a[0], b[0]], axis=1)
    idx = np.concatenate([a[1], b[1]], axis=1)
    order = np.lexsort((idx, -vals), axis=1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def sort_neighbors(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row of (Q, k) ``(scores, indices)`` by the ranking rule."""
    order = np.lexsort((indices, -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def full_ranking(query: np.ndarray, gallery: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Rank the whole gallery for every query by descending cosine similarity.

    query: (Q, D), gallery: (G, D) float32, already L2-normalised. Returns
    (Q, G) int64 gallery indices, best first, by the ranking rule (a stable
    sort of the negated scores). Works on ``chunk`` queries at a time, so the
    score matrix held at once is at most (chunk, G). Meant for small sets
    (validation); large evaluations count ranks without sorting indices.
    """
    query = np.asarray(query, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) and (G, D) embeddings, got {query.shape} and {gallery.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = np.empty((query.shape[0], gallery.shape[0]), dtype=np.int64)
    for start in range(0, query.shape[0], chunk):
        scores = query[start : start + chunk] @ gallery.T
        out[start : start + chunk] = np.argsort(-scores, axis=1, kind="stable")
    return out
