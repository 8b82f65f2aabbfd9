"""Metrics of ranked lists given as a (Q, K) relevance matrix (top-k lists, small full rankings).

Each function turns the matrix into hit ranks and calls the formulas in
:mod:`clipret.metrics.from_ranks`; the conventions are in :mod:`clipret.metrics`.
"""

from __future__ import annotations

import numpy as np

from clipret.metrics.from_ranks import first_hit_rank, per_query_metrics, summarize

__all__ = [
    "recall_at_k",
    "precision_at_k",
    "map_at_k",
    "mean_average_precision",
    "map_at_r",
    "r_precision",
    "rank_relevance",
    "count_relevant",
    "encode_labels",
    "hit_ranks",
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


def hit_ranks(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, K) bool -> (ranks (H,) int64 1-based, offsets (Q+1,) int64), the CSR layout of the hits."""
    relevance = _check_relevance(relevance)
    rows, cols = np.nonzero(relevance)
    offsets = np.zeros(relevance.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=relevance.shape[0]), out=offsets[1:])
    return cols.astype(np.int64) + 1, offsets


def _values(relevance: np.ndarray, n_relevant: np.ndarray | None, ks=(), *, full: bool = False):
    """Per-query metric values and the mask of queries that count in the means."""
    relevance = _check_relevance(relevance)
    q = relevance.shape[0]
    if n_relevant is None:  # every row counts; R only bounds the hits
        r, keep = relevance.sum(axis=1).astype(np.int64), np.ones(q, dtype=bool)
    else:
        r = np.asarray(n_relevant)
        if r.shape != (q,):
            raise ValueError(f"n_relevant must have shape ({q},), got {r.shape}")
        r = r.astype(np.int64)
        keep = r > 0
    ranks, offsets = hit_ranks(relevance)
    return per_query_metrics(ranks, offsets, r, ks, full=full), keep, r


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def recall_at_k(relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """Fraction of queries with at least one relevant item in the top ``k``.

    relevance: (Q, K) bool; k: 1 <= k <= K; n_relevant: optional (Q,) int,
    when given queries with R == 0 are excluded.
    """
    _check_relevance(relevance, k)
    v, keep, _ = _values(relevance, n_relevant, [k])
    return _mean(v[f"recall@{int(k)}"][keep])


def precision_at_k(relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """Mean over queries of (#relevant in the top ``k``) / ``k``.

    relevance: (Q, K) bool; k: 1 <= k <= K; n_relevant: optional (Q,) int,
    when given queries with R == 0 are excluded.
    """
    _check_relevance(relevance, k)
    v, keep, _ = _values(relevance, n_relevant, [k])
    return _mean(v[f"precision@{int(k)}"][keep])


def map_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean over queries of AP@k = sum_{i<=k} P@i * rel_i / min(k, R).

    The denominator is min(k, R), NOT the number of hits in the top k: dividing
    by hits (the seed project's bug) scores a list with a single relevant item
    at rank 1 as perfect even when R > 1 more relevant items were missed.

    relevance: (Q, K) bool with 1 <= k <= K; n_relevant: (Q,) int.
    """
    _check_relevance(relevance, k)
    v, keep, _ = _values(relevance, n_relevant, [k])
    return _mean(v[f"map@{int(k)}"][keep])


def mean_average_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """Full-ranking mAP: mean over queries of sum_i P@i * rel_i / R.

    relevance: (Q, K) bool that must contain every relevant item of each query
    (K == gallery size, or lists long enough that row sums equal R), else
    ValueError. n_relevant: (Q,) int.
    """
    v, keep, _ = _values(relevance, n_relevant, full=True)
    return _mean(v["map"][keep])


def _check_depth(relevance: np.ndarray, r: np.ndarray, keep: np.ndarray, name: str) -> None:
    if keep.any() and r[keep].max() > relevance.shape[1]:
        raise ValueError(f"{name} needs ranked lists at least R long (max R {r[keep].max()} > K {relevance.shape[1]})")


def map_at_r(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check").

    Per query: sum_{i<=R} P@i * rel_i / R. relevance: (Q, K) bool with
    K >= max R over the included queries; n_relevant: (Q,) int.
    """
    v, keep, r = _values(relevance, n_relevant)
    _check_depth(relevance, r, keep, "map_at_r")
    return _mean(v["map@r"][keep])


def r_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """R-precision: mean over queries of (#relevant in the top R) / R.

    relevance: (Q, K) bool with K >= max R over the included queries;
    n_relevant: (Q,) int.
    """
    v, keep, r = _values(relevance, n_relevant)
    _check_depth(relevance, r, keep, "r_precision")
    return _mean(v["r_precision"][keep])


def encode_labels(query_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray, int]:
    """(Q,) and (G,) labels -> (Q,) and (G,) int64 codes over their union (np.unique), and its size."""
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    if q.ndim != 1 or g.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {q.shape} and {g.shape}")
    text = [a.dtype.kind in "USO" for a in (q, g)]
    if q.size and g.size and text[0] != text[1]:
        raise ValueError(f"query and gallery labels have different types ({q.dtype} vs {g.dtype})")
    uniq, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: q.size], codes[q.size :], uniq.size


def rank_relevance(query_labels, gallery_labels, ranked_indices: np.ndarray) -> np.ndarray:
    """(Q,) labels, (G,) labels, (Q, K) int gallery indices -> (Q, K) bool relevance."""
    q, g, _ = encode_labels(query_labels, gallery_labels)
    ranked = np.asarray(ranked_indices)
    if ranked.ndim != 2 or ranked.shape[0] != q.size or ranked.dtype.kind not in "iu":
        raise ValueError(f"ranked_indices must be ({q.size}, K) ints, got {ranked.dtype} {ranked.shape}")
    if ranked.size and (ranked.min() < 0 or ranked.max() >= g.size):
        raise ValueError(f"ranked_indices must lie in [0, {g.size})")
    return g[ranked] == q[:, None]


def count_relevant(query_labels, gallery_labels) -> np.ndarray:
    """(Q,) labels, (G,) labels -> (Q,) int64 number of gallery items sharing each query's label."""
    q, g, n = encode_labels(query_labels, gallery_labels)
    return np.bincount(g, minlength=n).astype(np.int64)[q]


def evaluate_topk(query_labels, gallery_labels, ranked_indices: np.ndarray, ks, *,
                  exclude: np.ndarray | None = None, return_per_query: bool = False):
    """Metrics for top-K lists (e.g. results.json) against the full gallery labels.

    query_labels (Q,), gallery_labels (G,), ranked_indices (Q, K) ints, ks:
    list lengths with 1 <= k <= K. ``exclude`` (Q,) int: a gallery row that
    is the query's own item (-1: none); it does not count in R, and must not
    be in the query's list. Returns ``recall@k``, ``precision@k``,
    ``map@k`` for each k, ``n_queries`` (Q, all queries) and
    ``n_queries_without_relevant`` (R == 0, excluded from the means).
    ``map@r`` and ``r_precision`` are added only when K >= max R; ``map`` only
    when every list contains all R relevant items of its query (else unknown).
    ``return_per_query``: return ``(summary, per_query)``, where ``per_query`` holds the (Q,)
    values the means are taken over (the same names, float64), plus ``n_relevant`` and
    ``first_hit_rank`` (1-based, 0 when the list holds no relevant item), both int64.
    """
    relevance = rank_relevance(query_labels, gallery_labels, ranked_indices)
    n_relevant = count_relevant(query_labels, gallery_labels)
    if exclude is not None:
        own = np.asarray(exclude, dtype=np.int64)
        if own.shape != n_relevant.shape:
            raise ValueError(f"exclude must have shape {n_relevant.shape}, got {own.shape}")
        if (own[:, None] == np.asarray(ranked_indices)).any():
            raise ValueError("a query's own item is in its ranked list; remove it before scoring")
        q_l, g_l = np.asarray(query_labels), np.asarray(gallery_labels)
        n_relevant = n_relevant - ((own >= 0) & (g_l[np.maximum(own, 0)] == q_l))
    return _evaluate(relevance, n_relevant, ks, return_per_query=return_per_query)


def evaluate_full(query_labels, gallery_labels, ranked_indices: np.ndarray, ks) -> dict[str, float]:
    """Metrics for a full ranking: ranked_indices (Q, G), each row ranks the whole gallery.

    Returns everything :func:`evaluate_topk` does plus ``map``, ``map@r`` and
    ``r_precision``.
    """
    ranked = np.asarray(ranked_indices)
    if ranked.ndim != 2 or ranked.shape[1] != np.asarray(gallery_labels).shape[0]:
        raise ValueError(f"a full ranking has one column per gallery item, got shape {ranked.shape}")
    relevance = rank_relevance(query_labels, gallery_labels, ranked)
    return _evaluate(relevance, count_relevant(query_labels, gallery_labels), ks, full=True)


def _evaluate(relevance: np.ndarray, n_relevant: np.ndarray, ks, *, full: bool | None = None, return_per_query: bool = False):
    """The body both ``evaluate_*`` share: (Q, K) bool relevance and (Q,) R -> the summary.

    ``full``: whether every list holds all R relevant items of its query (``map`` is then
    known); None decides from the lists. ``map@r`` and ``r_precision`` are left out when some
    R exceeds K (they need the top R). ``return_per_query``: see :func:`evaluate_topk`.
    """
    ks = [int(k) for k in ks]
    for k in ks:
        _check_relevance(relevance, k)
    ranks, offsets = hit_ranks(relevance)
    if full is None:
        full = bool(np.array_equal(np.diff(offsets), n_relevant))
    values = per_query_metrics(ranks, offsets, n_relevant, ks, full=full)
    if n_relevant.size and n_relevant.max() > relevance.shape[1]:
        del values["map@r"], values["r_precision"]
    summary = summarize(values, n_relevant)
    if not return_per_query:
        return summary
    return summary, {**values, "n_relevant": n_relevant, "first_hit_rank": first_hit_rank(ranks, offsets)}
