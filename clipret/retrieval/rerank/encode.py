"""k-reciprocal encoding: the sparse vectors V of Zhong et al. (CVPR 2017), from neighbour lists.

Input: every item's neighbour list (item ids, best first, the item itself
included) and its row normaliser. For item i:

* R(i): the items j among i's first k1+1 neighbours that have i among their
  first k1+1 (k-reciprocal);
* for each c in R(i), its half set R_h(c) (the same with round(k1/2)+1
  entries, numpy rounding) is added when more than 2/3 of it lies in R(i);
* V[i, j] = exp(-d(i, j)) over the expanded set, scaled to sum to 1, with d
  the squared distance divided by i's largest distance;
* local query expansion: V_qe[i] = mean of V over i's first k2 neighbours.

V is a CSR matrix with a few dozen entries per row; nothing here is dense in
the number of items except scratch blocks of (chunk, items).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipret.retrieval.rerank.knn import stable_order

PairScores = Callable[[np.ndarray, np.ndarray], np.ndarray]
_BLOCK = 1 << 21  # gathered entries per block
_SCRATCH = 1 << 23  # entries of a (rows, items) scratch block


@dataclass(frozen=True)
class Csr:
    """A sparse (n, n_cols) float32 matrix: row i holds ``indices/data[indptr[i]:indptr[i+1]]``."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int32 column ids
    data: np.ndarray  # (nnz,) float32

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    def rows_of_entries(self) -> np.ndarray:
        """(nnz,) int64 the row of every stored entry."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr))


def half_length(k1: int) -> int:
    """Entries of a half list: round(k1 / 2) + 1 with numpy's round-half-to-even."""
    return int(np.around(k1 / 2.0)) + 1


def reciprocal_mask(nb: np.ndarray, length: int, chunk: int | None = None) -> np.ndarray:
    """(N, length) bool: is nb[i, p] k-reciprocal, i.e. is i among nb[nb[i, p], :length]?"""
    n = nb.shape[0]
    out = np.empty((n, length), dtype=bool)
    step = chunk or max(1, _BLOCK // (length * length))
    for a in range(0, n, step):
        fwd = nb[a : a + step, :length]
        back = nb[fwd, :length]
        ids = np.arange(a, a + fwd.shape[0])[:, None, None]
        out[a : a + fwd.shape[0]] = (back == ids).any(axis=2)
    return out


def segment_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def encode(
    nb: np.ndarray,
    nb_scores: np.ndarray,
    max_dist: np.ndarray,
    k1: int,
    pair_scores: PairScores,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Csr:
    """V for all N items, from (N, m) neighbour lists ``nb``/``nb_scores`` (m >= min(k1 + 1, N)).

    ``max_dist`` (N,) is each item's largest squared distance to any item;
    ``pair_scores(i, j)`` returns the cosine similarities of item pairs that
    the expansion reaches outside i's list. ``chunk`` rows are encoded at a
    time (default: a fixed scratch budget).
    """
    n = nb.shape[0]
    k = min(k1 + 1, n)
    h = min(half_length(k1), n)
    nb = nb.astype(np.int32) if n < 1 << 31 else nb  # halves the gathers below
    recip = reciprocal_mask(nb, k, chunk)
    half = reciprocal_mask(nb, h, chunk)
    step = chunk or max(1, min(n, _BLOCK // (k * h), _SCRATCH // n))
    member = np.zeros((step, n), dtype=bool)  # scratch: member[r, j] <=> j in R(a + r); reset after use
    indptr = np.zeros(n + 1, dtype=np.int64)
    parts_i, parts_w = [], []
    for a in range(0, n, step):
        fwd, rk = nb[a : a + step, :k], recip[a : a + step]
        b = fwd.shape[0]
        r_rows, r_pos = np.nonzero(rk)
        r_ids, r_sc = fwd[r_rows, r_pos], nb_scores[a : a + b, :k][r_rows, r_pos]
        member[r_rows, r_ids] = True
        hs = nb[r_ids, :h]  # (P, h): the half list of each reciprocal candidate c of row r
        hm = half[r_ids]  # c's half set
        in_r = member[r_rows[:, None], hs]  # is that entry in R(row)?
        member[r_rows, r_ids] = False
        accept = (hm & in_r).sum(axis=1) > 2.0 / 3.0 * hm.sum(axis=1)
        new = hm & ~in_r & accept[:, None]  # expansion entries not already in R(row)
        keys = np.sort(np.repeat(r_rows, new.sum(axis=1)) * n + hs[new])
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys
        n_rows, n_ids = np.divmod(keys, n)
        n_sc = pair_scores(n_rows + a, n_ids) if n_ids.size else np.zeros(0, np.float32)
        rows = np.concatenate([r_rows, n_rows])
        o = stable_order(rows, b)
        rows, ids = rows[o], np.concatenate([r_ids, n_ids])[o]
        sc = np.concatenate([r_sc, n_sc]).astype(np.float32)[o]
        top = max_dist[a + rows]
        dist = np.maximum(2.0 - 2.0 * sc, 0.0)
        dist = np.divide(dist, top, out=np.zeros_like(dist), where=top > 0)
        w = np.exp(-dist)
        total = np.bincount(rows, weights=w, minlength=b)
        parts_i.append(ids.astype(np.int32))
        parts_w.append((w / total[rows]).astype(np.float32))
        indptr[a + 1 : a + b + 1] = np.bincount(rows, minlength=b)
        if on_progress is not None:
            on_progress(b)
    np.cumsum(indptr, out=indptr)
    return Csr(indptr, np.concatenate(parts_i), np.concatenate(parts_w))


def expand(v: Csr, nb: np.ndarray, k2: int, n_cols: int, chunk: int | None = None) -> Csr:
    """Local query expansion: row i of the result is the mean of v's rows nb[i, :k2].

    ``chunk`` rows at a time (default: a fixed scratch budget).
    """
    n = v.n_rows
    k2 = min(k2, nb.shape[1], n)
    per_row = k2 * max(1, v.indices.size // max(1, n))
    step = chunk or max(1, min(n, _SCRATCH // n_cols, _BLOCK // per_row))
    owner = np.empty(step * n_cols, dtype=np.int32)  # scratch: read only where this block wrote
    indptr = np.zeros(n + 1, dtype=np.int64)
    parts_i, parts_v = [], []
    for a in range(0, n, step):
        src = nb[a : a + step, :k2]
        b = src.shape[0]
        lengths = (v.indptr[src + 1] - v.indptr[src]).ravel()
        at = segment_positions(v.indptr[src].ravel(), lengths)
        rows = np.repeat(np.repeat(np.arange(b), k2), lengths)
        cols = v.indices[at]
        key = rows * n_cols + cols
        t = np.arange(key.size, dtype=np.int32)
        owner[key] = t
        rep = owner[key]  # one representative entry per (row, column); rows stay grouped
        first = rep == t
        uid = np.cumsum(first) - 1
        sums = np.bincount(uid[rep], weights=v.data[at], minlength=int(uid[-1]) + 1 if uid.size else 0)
        parts_i.append(cols[first])
        parts_v.append((sums / k2).astype(np.float32))
        indptr[a + 1 : a + b + 1] = np.bincount(rows[first], minlength=b)
    np.cumsum(indptr, out=indptr)
    return Csr(indptr, np.concatenate(parts_i), np.concatenate(parts_v))
