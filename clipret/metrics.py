"""Retrieval metrics as pure numpy functions (no torch).

Conventions shared by every function here:

* ``relevance``: ``(Q, K)`` bool array. ``relevance[q, j]`` is True when the
  j-th ranked gallery item for query ``q`` (best first, ``j = 0`` is rank 1)
  has the query's label.
* ``n_relevant``: ``(Q,)`` int array. ``R``, the number of gallery items with
  the query's label in the WHOLE gallery, not only in the top K.
* Queries with ``R == 0`` are excluded from every mean; the ``evaluate_*``
  functions report how many were excluded as ``n_queries_without_relevant``.
  ``recall_at_k``/``precision_at_k`` exclude them only when given ``n_relevant``.
  A mean over no query at all is ``nan``.
* ``P@i`` is the precision of the top ``i`` items; ``rel_i`` is 1 when the item
  at rank ``i`` is relevant. Ranks start at 1 in the formulas.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "recall_at_k",
    "precision_at_k",
    "map_at_k",
    "mean_average_precision",
    "map_at_r",
    "r_precision",
    "rank_relevance",
    "count_relevant",
    "evaluate_topk",
    "evaluate_full",
]


def _check_relevance(relevance: np.ndarray, k: int | None = None) -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.ndim != 2 or relevance.dtype != np.bool_:
        raise ValueError(f"relevance must be a 2-D bool array, got {relevance.dtype} {relevance.shape}")
    if k is not None and not 1 <= int(k) <= relevance.shape[1]:
        raise ValueError(f"k must be in [1, {relevance.shape[1]}] (the ranked list length), got {k}")
    return relevance


def _included(relevance: np.ndarray, n_relevant: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Drop queries with R == 0; check that no row has more hits than R."""
    if n_relevant is None:
        return relevance, None
    n_relevant = np.asarray(n_relevant)
    if n_relevant.shape != (relevance.shape[0],):
        raise ValueError(f"n_relevant must have shape ({relevance.shape[0]},), got {n_relevant.shape}")
    if np.any(relevance.sum(axis=1) > n_relevant):
        raise ValueError("a query has more relevant items in its list than n_relevant says")
    keep = n_relevant > 0
    return relevance[keep], n_relevant[keep].astype(np.int64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _sum_precision_at_hits(relevance: np.ndarray) -> np.ndarray:
    """(Q, K) bool -> (Q,) sum over ranks i of P@i * rel_i."""
    hits = np.cumsum(relevance, axis=1, dtype=np.float64)
    ranks = np.arange(1, relevance.shape[1] + 1, dtype=np.float64)
    return np.where(relevance, hits / ranks, 0.0).sum(axis=1)


def recall_at_k(relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """Fraction of queries with at least one relevant item in the top ``k``.

    relevance: (Q, K) bool; k: 1 <= k <= K; n_relevant: optional (Q,) int,
    when given queries with R == 0 are excluded.
    """
    rel, _ = _included(_check_relevance(relevance, k), n_relevant)
    return _mean(rel[:, :k].any(axis=1).astype(np.float64))


def precision_at_k(relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """Mean over queries of (#relevant in the top ``k``) / ``k``.

    relevance: (Q, K) bool; k: 1 <= k <= K; n_relevant: optional (Q,) int,
    when given queries with R == 0 are excluded.
    """
    rel, _ = _included(_check_relevance(relevance, k), n_relevant)
    return _mean(rel[:, :k].sum(axis=1) / float(k))


def map_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over queries of AP@k = sum_{i<=k} P@i * rel_i / min(k, R).

    The denominator is min(k, R), NOT the number of hits in the top k: dividing
    by hits (the seed project's bug) scores a list with a single relevant item
    at rank 1 as perfect even when R > 1 more relevant items were missed.

    relevance: (Q, K) bool with 1 <= k <= K; n_relevant: (Q,) int.
    """
    rel, r = _included(_check_relevance(relevance, k), n_relevant)
    return _mean(_sum_precision_at_hits(rel[:, :k]) / np.minimum(k, r))


def mean_average_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """Full-ranking mAP: mean over queries of sum_i P@i * rel_i / R.

    relevance: (Q, K) bool that must contain every relevant item of each query
    (K == gallery size, or lists long enough that row sums equal R), else
    ValueError. n_relevant: (Q,) int.
    """
    rel, r = _included(_check_relevance(relevance), n_relevant)
    if np.any(rel.sum(axis=1) != r):
        raise ValueError("mean_average_precision needs every relevant item inside the ranked lists")
    return _mean(_sum_precision_at_hits(rel) / r)


def _top_r(relevance: np.ndarray, n_relevant: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    rel, r = _included(_check_relevance(relevance), n_relevant)
    if r.size and r.max() > rel.shape[1]:
        raise ValueError(f"{name} needs ranked lists at least R long (max R {r.max()} > K {rel.shape[1]})")
    return rel & (np.arange(rel.shape[1]) < r[:, None]), r


def map_at_r(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check").

    Per query: sum_{i<=R} P@i * rel_i / R. relevance: (Q, K) bool with
    K >= max R over the included queries; n_relevant: (Q,) int.
    """
    rel, r = _top_r(relevance, n_relevant, "map_at_r")
    return _mean(_sum_precision_at_hits(rel) / r)


def r_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """R-precision: mean over queries of (#relevant in the top R) / R.

    relevance: (Q, K) bool with K >= max R over the included queries;
    n_relevant: (Q,) int.
    """
    rel, r = _top_r(relevance, n_relevant, "r_precision")
    return _mean(rel.sum(axis=1) / r)


def _encode_labels(query_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray, int]:
    """Map both label arrays to int codes over their union (np.unique)."""
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    if q.ndim != 1 or g.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {q.shape} and {g.shape}")
    text = [a.dtype.kind in "USO" for a in (q, g)]
    if q.size and g.size and text[0] != text[1]:
        raise ValueError(f"query and gallery labels have different types ({q.dtype} vs {g.dtype})")
    uniq, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = codes.reshape(-1)
    return codes[: q.size], codes[q.size :], uniq.size


def rank_relevance(query_labels, gallery_labels, ranked_indices: np.ndarray) -> np.ndarray:
    """(Q,) labels, (G,) labels, (Q, K) int gallery indices -> (Q, K) bool relevance."""
    q, g, _ = _encode_labels(query_labels, gallery_labels)
    ranked = np.asarray(ranked_indices)
    if ranked.ndim != 2 or ranked.shape[0] != q.size or ranked.dtype.kind not in "iu":
        raise ValueError(f"ranked_indices must be ({q.size}, K) ints, got {ranked.dtype} {ranked.shape}")
    if ranked.size and (ranked.min() < 0 or ranked.max() >= g.size):
        raise ValueError(f"ranked_indices must lie in [0, {g.size})")
    return g[ranked] == q[:, None]


def count_relevant(query_labels, gallery_labels) -> np.ndarray:
    """(Q,) labels, (G,) labels -> (Q,) int64 number of gallery items sharing each query's label."""
    q, g, n = _encode_labels(query_labels, gallery_labels)
    return np.bincount(g, minlength=n).astype(np.int64)[q]


def _evaluate(relevance: np.ndarray, n_relevant: np.ndarray, ks) -> dict[str, float]:
    ks = [int(k) for k in ks]
    for k in ks:
        _check_relevance(relevance, k)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(relevance, k, n_relevant)
        out[f"precision@{k}"] = precision_at_k(relevance, k, n_relevant)
        out[f"map@{k}"] = map_at_k(relevance, n_relevant, k)
    out["n_queries"] = int(relevance.shape[0])
    out["n_queries_without_relevant"] = int(np.sum(n_relevant == 0))
    return out


def evaluate_topk(query_labels, gallery_labels, ranked_indices: np.ndarray, ks) -> dict[str, float]:
    """Metrics for top-K lists (e.g. results.json) against the full gallery labels.

    query_labels (Q,), gallery_labels (G,), ranked_indices (Q, K) ints, ks:
    list lengths with 1 <= k <= K. Returns ``recall@k``, ``precision@k``,
    ``map@k`` for each k, ``n_queries`` (Q, all queries) and
    ``n_queries_without_relevant`` (R == 0, excluded from the means).
    ``map@r`` and ``r_precision`` are added only when K >= max R; ``map`` only
    when every list contains all R relevant items of its query (else unknown).
    """
    relevance = rank_relevance(query_labels, gallery_labels, ranked_indices)
    n_relevant = count_relevant(query_labels, gallery_labels)
    out = _evaluate(relevance, n_relevant, ks)
    if not n_relevant.size or n_relevant.max() <= relevance.shape[1]:
        out["map@r"] = map_at_r(relevance, n_relevant)
        out["r_precision"] = r_precision(relevance, n_relevant)
    if np.array_equal(relevance.sum(axis=1), n_relevant):
        out["map"] = mean_average_precision(relevance, n_relevant)
    return out


def evaluate_full(query_labels, gallery_labels, ranked_indices: np.ndarray, ks) -> dict[str, float]:
    """Metrics for a full ranking: ranked_indices (Q, G), each row ranks the whole gallery.

    Returns everything :func:`evaluate_topk` does plus ``map``, ``map@r`` and
    ``r_precision``.
    """
    ranked = np.asarray(ranked_indices)
    if ranked.ndim != 2 or ranked.shape[1] != np.asarray(gallery_labels).shape[0]:
        raise ValueError(f"a full ranking has one column per gallery item, got shape {ranked.shape}")
    relevance = rank_relevance(query_labels, gallery_labels, ranked)
    n_relevant = count_relevant(query_labels, gallery_labels)
    out = _evaluate(relevance, n_relevant, ks)
    out["map"] = mean_average_precision(relevance, n_relevant)
    out["map@r"] = map_at_r(relevance, n_relevant)
    out["r_precision"] = r_precision(relevance, n_relevant)
    return out
