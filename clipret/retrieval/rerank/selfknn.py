"""Exact k-nearest-neighbour lists of a set against itself, computing each pair once.

The (n, n) similarity matrix is symmetric, so it is walked in square blocks
on and above the diagonal: block (I, J) feeds the lists of the items in I
(its rows) and, when J != I, of the items in J (its columns). Half the
matrix products of a row-by-row pass, and s(i, j) == s(j, i) exactly.

Each item keeps a running top ``m``; a block only contributes entries that
reach the item's current m-th best (ties included, the merge applies the
ranking rule). An item whose list is not full yet uses the group-maximum
lower bound of :func:`~clipret.retrieval.rerank.knn.lower_bound` over the
block instead. Memory: the (n, m) lists plus one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from clipret.retrieval.ranking import merge_topk
from clipret.retrieval.rerank.knn import (
    BLOCK_SCORES,
    candidates,
    lower_bound,
    pad_groups,
    stable_order,
)


def _absorb(
    top_s: np.ndarray, top_i: np.ndarray, items: np.ndarray, nbrs: np.ndarray, vals: np.ndarray, n: int
) -> None:
    """Merge (item, neighbour, score) triples, grouped by item, into the running lists."""
    if items.size == 0:
        return
    hit, new_s, new_i = pad_groups(items, nbrs, vals, n)  # padding (id n) sorts after every real item
    top_s[hit], top_i[hit] = merge_topk((top_s[hit], top_i[hit]), (new_s, new_i), top_s.shape[1])


def _bounds(current: np.ndarray, scores: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Each line's current m-th best, or for lines with an unfilled list a lower bound from ``scores``."""
    empty = np.isneginf(current)
    if not empty.any():
        return current
    return np.where(empty, lower_bound(scores, m, axis), current)


def symmetric_knn(
    x: np.ndarray, m: int, chunk: int | None = None, on_progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's top ``m`` neighbours among all rows of (n, D) float32 ``x``, itself included.

    Returns (indices (n, m') int64, scores (n, m') float32, min_scores (n,)
    float32) with m' = min(m, n), lists best first by the ranking rule.
    ``chunk`` bounds the scores held at once to ``chunk * n``, as a row-by-row
    pass of ``chunk`` rows would (default: about :data:`BLOCK_SCORES`).
    ``on_progress`` receives the number of rows finished.
    """
    n = x.shape[0]
    m = min(m, n)
    b = max(m, math.isqrt(chunk * n if chunk else BLOCK_SCORES))
    top_s = np.full((n, m), -np.inf, dtype=np.float32)
    top_i = np.full((n, m), n, dtype=np.int64)
    mins = np.full(n, np.inf, dtype=np.float32)
    buf = np.empty(min(b, n) ** 2, dtype=np.float32)
    mask = np.empty(buf.size, dtype=bool)
    for i0 in range(0, n, b):
        xi = np.ascontiguousarray(x[i0 : i0 + b], dtype=np.float32)
        ri = slice(i0, i0 + xi.shape[0])
        for j0 in range(i0, n, b):
            xj = xi if j0 == i0 else np.ascontiguousarray(x[j0 : j0 + b], dtype=np.float32)
            rj = slice(j0, j0 + xj.shape[0])
            s = np.matmul(xi, xj.T, out=buf[: xi.shape[0] * xj.shape[0]].reshape(xi.shape[0], xj.shape[0]))
            blk_mask = mask[: s.size].reshape(s.shape)
            np.minimum(mins[ri], s.min(axis=1), out=mins[ri])
            r, c, v = candidates(s, _bounds(top_s[ri, m - 1], s, m, axis=1)[:, None], blk_mask)
            _absorb(top_s, top_i, r + i0, c + j0, v, n)
            if j0 != i0:
                np.minimum(mins[rj], s.min(axis=0), out=mins[rj])
                r, c, v = candidates(s, _bounds(top_s[rj, m - 1], s, m, axis=0)[None, :], blk_mask)
                o = stable_order(c, s.shape[1])
                _absorb(top_s, top_i, c[o] + j0, r[o] + i0, v[o], n)
        if on_progress is not None:
            on_progress(xi.shape[0])
    return top_i, top_s, mins
