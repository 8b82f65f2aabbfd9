"""One query batch, encoded for k-reciprocal re-ranking: Jaccard overlaps, final distances, top k.

:class:`RerankBatch` holds the queries' expanded V rows and an inverted index
(column -> gallery rows) of the gallery's. For a block of queries the
overlap sum_c min(V_q[c], V_g[c]) is accumulated over the gallery items that
share a column with the query; every other gallery item has overlap 0 and
final distance (1 - lam) + lam * original. The exact top k is therefore the
best of the overlapping items and of the items nearest by original distance
(each query keeps its L nearest gallery rows from the exact pass); a query
whose k-th distance could be reached by an unlisted row is redone over the
whole gallery (rare).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipret.retrieval.ranking import topk_rows
from clipret.retrieval.rerank.encode import Csr, segment_positions
from clipret.retrieval.rerank.knn import ragged_topk

_SCRATCH = 1 << 23  # (rows, G) float32 Jaccard accumulator entries per block (32 MiB)
_GATHER = 1 << 22  # inverted-index entries gathered per block
_PAIRS = 1 << 14  # vector pairs gathered at once
_SCORE_EPS = 1e-5  # bound on the float32 rounding of one cosine score


def final_distance(overlap: np.ndarray, original: np.ndarray, lam: float) -> np.ndarray:
    """(1 - lam) * jaccard + lam * original, float32; jaccard = 1 - m / (2 - m) for overlap m."""
    m = overlap.astype(np.float32)
    jaccard = np.where(m > 0, np.float32(1) - m / (np.float32(2) - m), np.float32(1))
    return jaccard * np.float32(1.0 - lam) + original.astype(np.float32) * np.float32(lam)


def original_distance(scores: np.ndarray, max_dist: np.ndarray) -> np.ndarray:
    """Normalised squared distance from cosine scores: max(2 - 2 s, 0) / max_dist (0 where max_dist is 0)."""
    d = np.maximum(np.float32(2) - np.float32(2) * scores, np.float32(0))
    return np.divide(d, max_dist, out=np.zeros_like(d), where=max_dist > 0)


class Items:
    """All Q+G items by global id (queries first) without concatenating them."""

    def __init__(self, query: np.ndarray, gallery: np.ndarray) -> None:
        self.query, self.gallery, self.nq = query, gallery, query.shape[0]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and ids.min() >= self.nq:
            return np.take(self.gallery, ids - self.nq, axis=0)
        if ids.size and ids.max() < self.nq:
            return np.take(self.query, ids, axis=0)
        out = np.empty((ids.size, self.query.shape[1]), dtype=np.float32)
        is_q = ids < self.nq
        out[is_q] = self.query[ids[is_q]]
        out[~is_q] = self.gallery[ids[~is_q] - self.nq]
        return out

    def pair_scores(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(n,) float32 cosine similarity of items i[t] and j[t]."""
        out = np.empty(i.size, dtype=np.float32)
        for a in range(0, i.size, _PAIRS):
            out[a : a + _PAIRS] = np.einsum("nd,nd->n", self.rows(i[a : a + _PAIRS]), self.rows(j[a : a + _PAIRS]))
        return out


@dataclass
class RerankBatch:
    """What re-ranking needs for one query batch; see :func:`prepare_rerank`.

    query (Q, D) float32, gallery (G, D); ``max_dist`` (Q,) each query's
    largest squared distance; ``v_query`` the queries' expanded V rows
    (Csr over Q+G columns); ``inv_*`` the inverted index of the gallery's
    expanded V (column -> gallery rows and values); ``top``/``top_scores``
    (Q, L) each query's L nearest gallery rows.
    """

    query: np.ndarray
    gallery: np.ndarray
    lam: float
    max_dist: np.ndarray
    v_query: Csr
    inv_ptr: np.ndarray
    inv_rows: np.ndarray
    inv_vals: np.ndarray
    top: np.ndarray
    top_scores: np.ndarray

    @property
    def n_gallery(self) -> int:
        return int(self.gallery.shape[0])

    def _blocks(self, chunk: int | None, start: int = 0, stop: int | None = None, cells: int = _SCRATCH,
                gather: int = _GATHER) -> np.ndarray:
        """Query block boundaries over start..stop: ``chunk`` rows, or blocks of at most ``cells``
        (rows x G) scratch entries and about ``gather`` inverted-index entries (at least one row each)."""
        stop = self.query.shape[0] if stop is None else stop
        if chunk is not None:
            return np.r_[np.arange(start, stop, chunk), stop]
        ip = self.v_query.indptr[start : stop + 1]
        cols = self.v_query.indices[ip[0] : ip[-1]]
        work = np.r_[0, np.cumsum(self.inv_ptr[cols + 1] - self.inv_ptr[cols])][ip - ip[0]]  # gathered before each row
        starts, rows = [start], max(1, cells // self.n_gallery)
        while starts[-1] < stop:
            a = starts[-1]
            b = start + int(np.searchsorted(work, work[a - start] + gather, side="right")) - 1
            starts.append(min(stop, a + rows, max(a + 1, b)))
        return np.asarray(starts)

    def _overlap(self, a: int, b: int, acc: np.ndarray) -> None:
        """Add sum_c min(V_q[c], V_g[c]) of queries a..b-1 into flat (b - a, G) ``acc``."""
        lo, hi = self.v_query.indptr[a], self.v_query.indptr[b]
        cols, vals = self.v_query.indices[lo:hi], self.v_query.data[lo:hi]
        rows = np.repeat(np.arange(b - a), np.diff(self.v_query.indptr[a : b + 1]))
        lengths = self.inv_ptr[cols + 1] - self.inv_ptr[cols]
        at = segment_positions(self.inv_ptr[cols], lengths)
        key = np.repeat(rows, lengths) * self.n_gallery + self.inv_rows[at]
        np.add.at(acc, key, np.minimum(np.repeat(vals, lengths), self.inv_vals[at]))

    def distance_block(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """(stop - start, G) float32 final distances of queries start..stop-1 to the whole gallery.

        Written into ``out`` (a C-contiguous (stop - start, G) float32 array, reused across
        calls) or a new array. Memory besides it: one scratch of at most an eighth of the block
        (and at most 32 MiB) and the inverted-index entries gathered for that many rows.
        """
        c, g = stop - start, self.n_gallery
        if out is None:
            out = np.empty((c, g), dtype=np.float32)
        elif out.shape != (c, g) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({c}, {g}) float32 array, got {out.shape} {out.dtype}")
        cells = min(_SCRATCH, max(g, c * g // 8))
        starts = self._blocks(None, start, stop, cells=cells, gather=cells // 8)
        scratch = np.empty(int(np.diff(starts).max(initial=0)) * g, dtype=np.float32)
        gallery_t = np.asarray(self.gallery).T
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            part, jac = out[a - start : b - start], scratch[: (b - a) * g].reshape(b - a, g)
            part.fill(0)
            self._overlap(a, b, part.reshape(-1))
            # the same float32 operations as final_distance, in place: (1 - lam) * (1 - m / (2 - m))
            # (exactly 1 at m = 0) plus lam * original distance
            np.subtract(np.float32(2), part, out=jac)
            np.divide(part, jac, out=jac)
            np.subtract(np.float32(1), jac, out=jac)
            np.multiply(jac, np.float32(1.0 - self.lam), out=jac)
            np.matmul(self.query[a:b], gallery_t, out=part)
            md = self.max_dist[a:b, None]
            np.multiply(part, np.float32(2), out=part)
            np.subtract(np.float32(2), part, out=part)
            np.maximum(part, np.float32(0), out=part)
            np.divide(part, md, out=part, where=md > 0)
            part[md[:, 0] <= 0] = 0
            np.multiply(part, np.float32(self.lam), out=part)
            np.add(jac, part, out=part)
        return out

    def topk(
        self, k: int, chunk: int | None = None, on_progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's best ``k`` gallery rows: (final distances (Q, k'), rows (Q, k') int64), k' = min(k, G)."""
        nq, g = self.query.shape[0], self.n_gallery
        k = min(int(k), g)
        items = Items(self.query, self.gallery)
        out_d, out_i = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
        starts = self._blocks(chunk)
        acc = np.zeros(int(np.diff(starts).max()) * g, dtype=np.float32)
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            c, md = b - a, self.max_dist[a:b]
            self._overlap(a, b, acc)
            listed = (np.arange(c)[:, None] * g + self.top[a:b]).ravel()
            acc[listed] = np.where(acc[listed] > 0, acc[listed], np.float32(-1))  # keep them, overlap 0
            flat = np.flatnonzero(acc[: c * g] != 0)
            rows, cols = np.divmod(flat, g)
            overlap = np.maximum(acc[flat], 0)
            acc[flat] = 0
            keep = slice(None)
            if self.top.shape[1] >= k:
                # final >= (1 - lam) * jaccard, and the k-th best listed row bounds the k-th best of all:
                # only the candidates below that bound need their original distance
                at = np.searchsorted(flat, listed).reshape(c, -1)
                listed_final = final_distance(overlap[at], original_distance(self.top_scores[a:b], md[:, None]), self.lam)
                kth = np.partition(listed_final, k - 1, axis=1)[:, k - 1] + self._margin(md)
                keep = final_distance(overlap, np.zeros_like(overlap), self.lam) <= kth[rows]
            r, cl = rows[keep], cols[keep]
            final = final_distance(overlap[keep], original_distance(items.pair_scores(r + a, cl + nq), md[r]), self.lam)
            neg, idx = ragged_topk(r, cl, -final, c, k)
            out_d[a:b], out_i[a:b] = -neg, idx
            for row in np.flatnonzero(~self._proven(a, b, out_d[a:b, k - 1])):
                sel = rows == row
                orig = original_distance(items.pair_scores(np.full(int(sel.sum()), a + row), cols[sel] + nq), md[row])
                out_d[a + row], out_i[a + row] = self._full_row(a + row, cols[sel], final_distance(overlap[sel], orig, self.lam), k)
            if on_progress is not None:
                on_progress(c)
        return out_d, out_i

    def _margin(self, max_dist: np.ndarray) -> np.ndarray:
        """(c,) bound on how far float32 rounding can move a final distance (different score computations)."""
        scaled = np.divide(self.lam * 2 * _SCORE_EPS, max_dist, out=np.zeros_like(max_dist), where=max_dist > 0)
        return scaled + np.float32(1e-6)

    def _proven(self, a: int, b: int, kth: np.ndarray) -> np.ndarray:
        """(b - a,) bool: no gallery row outside the candidates can reach the k-th final distance ``kth``.

        Such a row overlaps nothing and lies beyond the listed L nearest, so its
        final distance is at least (1 - lam) + lam * original(L-th nearest).
        """
        if self.top.shape[1] >= self.n_gallery:
            return np.ones(b - a, dtype=bool)
        md = self.max_dist[a:b]
        floor = final_distance(np.zeros(b - a), original_distance(self.top_scores[a:b, -1], md), self.lam)
        return floor - self._margin(md) > kth

    def _full_row(self, q: int, cols: np.ndarray, final: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k of one query over the whole gallery (rare fallback, O(G D))."""
        scores = np.asarray(self.gallery) @ np.asarray(self.query[q], dtype=np.float32)
        row = final_distance(np.zeros(scores.size), original_distance(scores, self.max_dist[q]), self.lam)
        row[cols] = final
        neg, idx = topk_rows(-row[None, :], k)
        return -neg[0], idx[0]


