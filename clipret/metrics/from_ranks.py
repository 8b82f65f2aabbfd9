"""The metric formulas, written once, over the ranks of each query's relevant items.

Every metric in :mod:`clipret.metrics` is computed here; the relevance-matrix
functions and the streaming evaluation both reduce their input to *hit ranks*
first, so the two can never disagree.

Hit ranks are stored like a CSR matrix:

* ``ranks``: (H,) int64, 1-based ranks of relevant items, strictly increasing
  within each query;
* ``offsets``: (Q + 1,) int64, query ``q`` owns ``ranks[offsets[q]:offsets[q+1]]``;
* ``n_relevant``: (Q,) int64, R for each query (over the whole gallery).

If the m-th relevant item of a query sits at rank ``r_m``, then
``P@r_m = m / r_m`` and, for any depth ``d``:

* ``hits(d) = #{m : r_m <= d}``
* ``sum_prec(d) = sum_{m : r_m <= d} m / r_m``  (sum of P@i * rel_i for i <= d)

from which recall@k = [hits(k) > 0], precision@k = hits(k) / k,
AP@k = sum_prec(k) / min(k, R), MAP@R = sum_prec(R) / R,
R-precision = hits(R) / R and full AP = sum_prec(inf) / R.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["check_hit_ranks", "first_hit_rank", "per_query_metrics", "summarize"]


def check_hit_ranks(ranks: np.ndarray, offsets: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the CSR layout; returns (ranks, offsets, n_relevant) as int64 arrays."""
    ranks = np.asarray(ranks, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    q = n_relevant.shape[0] if n_relevant.ndim == 1 else -1
    if ranks.ndim != 1 or offsets.shape != (q + 1,) or offsets[0] != 0 or offsets[-1] != ranks.size:
        raise ValueError(f"need ranks (H,), offsets (Q+1,) from 0 to H and n_relevant (Q,); got "
                         f"{ranks.shape}, {offsets.shape}, {n_relevant.shape}")
    counts = np.diff(offsets)
    if np.any(counts < 0) or np.any(counts > n_relevant):
        raise ValueError("a query has more relevant items in its list than n_relevant says")
    if ranks.size:
        first = np.zeros(ranks.size, dtype=bool)
        first[offsets[:-1][counts > 0]] = True
        steps = np.diff(ranks, prepend=0)
        if ranks.min() < 1 or np.any(steps[~first] <= 0):
            raise ValueError("hit ranks must be >= 1 and strictly increasing within each query")
    return ranks, offsets, n_relevant


def per_query_metrics(
    ranks: np.ndarray,
    offsets: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int],
    *,
    full: bool,
) -> dict[str, np.ndarray]:
    """(Q,) float64 value of every metric for every query (including R == 0 ones).

    ``ks``: cut-offs for recall@k, precision@k, map@k. ``map@r`` and
    ``r_precision`` are always returned (they are exact for a query when its
    ranks are known at least R deep); ``map`` only when ``full`` (every query
    lists all R of its relevant items, checked). Values of queries with R == 0
    are meaningless; :func:`summarize` drops them.
    """
    ranks, offsets, n_relevant = check_hit_ranks(ranks, offsets, n_relevant)
    n_q = n_relevant.size
    counts = np.diff(offsets)
    owner = np.repeat(np.arange(n_q), counts)
    m = np.arange(ranks.size, dtype=np.int64) - np.repeat(offsets[:-1], counts) + 1
    precision_at_hit = m / ranks  # P@r_m, float64
    safe_r = np.maximum(n_relevant, 1).astype(np.float64)

    def hits(depth: np.ndarray | int) -> np.ndarray:
        inside = ranks <= (depth[owner] if isinstance(depth, np.ndarray) else depth)
        return np.bincount(owner, weights=inside.astype(np.float64), minlength=n_q)

    def sum_prec(depth: np.ndarray | int) -> np.ndarray:
        inside = ranks <= (depth[owner] if isinstance(depth, np.ndarray) else depth)
        return np.bincount(owner, weights=np.where(inside, precision_at_hit, 0.0), minlength=n_q)

    out: dict[str, np.ndarray] = {}
    for k in ks:
        k = int(k)
        within = hits(k)
        out[f"recall@{k}"] = (within > 0).astype(np.float64)
        out[f"precision@{k}"] = within / k
        out[f"map@{k}"] = sum_prec(k) / np.minimum(k, safe_r)
    if full:
        if not np.array_equal(counts, n_relevant):
            raise ValueError("mean_average_precision needs every relevant item inside the ranked lists")
        out["map"] = np.bincount(owner, weights=precision_at_hit, minlength=n_q) / safe_r
    out["map@r"] = sum_prec(n_relevant) / safe_r
    out["r_precision"] = hits(n_relevant) / safe_r
    return out


def first_hit_rank(ranks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(Q,) int64: the 1-based rank of each query's first relevant item in its list, 0 when it has none."""
    ranks, offsets = np.asarray(ranks, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    has = np.diff(offsets) > 0
    out = np.zeros(has.size, dtype=np.int64)
    out[has] = ranks[offsets[:-1][has]]
    return out


def summarize(values: Mapping[str, np.ndarray], n_relevant: np.ndarray) -> dict[str, float]:
    """Means over the queries with R > 0, plus ``n_queries`` and ``n_queries_without_relevant``.

    ``values``: name -> (Q,) per-query values (from :func:`per_query_metrics`,
    possibly concatenated over chunks). A mean over no query is ``nan``.
    Keys come out as recall@k, precision@k, map@k per k, the two counts, then
    map, map@r, r_precision when present.
    """
    n_relevant = np.asarray(n_relevant)
    keep = n_relevant > 0
    out: dict[str, float] = {}
    tail = ("map", "map@r", "r_precision")
    for name, v in values.items():
        if name not in tail:
            out[name] = _mean(np.asarray(v)[keep])
    out["n_queries"] = int(n_relevant.size)
    out["n_queries_without_relevant"] = int(np.sum(~keep))
    for name in tail:
        if name in values:
            out[name] = _mean(np.asarray(values[name])[keep])
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
