"""Exact neighbour lists for re-ranking, one block of rows at a time.

For a block of rows we compute the (rows, columns) cosine scores with one
matrix product, take each row's smallest score (the re-ranking row
normaliser needs the largest distance) and its top ``m`` columns by the
ranking rule of :mod:`clipret.retrieval.ranking`.

Selecting the top ``m`` of every row with ``argpartition`` costs more than the
matrix product. Instead we bound it: split each row's columns into groups
and take the ``m``-th largest group maximum. At least
``m`` distinct columns reach that value, so every column of the top ``m``
(ties included) scores at least as much. One comparison keeps the few
columns above the bound, and the exact top ``m`` is picked among them. The
result is exact; only the work shrinks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipret.retrieval.ranking import topk_rows

BLOCK_SCORES = 1 << 23  # scores held at once by default: 8M float32 = 32 MiB
_GROUP = 32  # columns per group for the lower bound


def rows_per_block(n_cols: int, chunk: int | None) -> int:
    """Rows per block: ``chunk`` if given, else as many as fit :data:`BLOCK_SCORES` scores."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    return max(1, BLOCK_SCORES // max(1, n_cols))


def stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Indices that sort non-negative integer ``keys`` (all < ``bound``) stably.

    Uses numpy's O(n) radix sort on 16-bit digits, least significant first.
    """
    keys = np.asarray(keys)
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    keys = keys.astype(np.uint64)
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while bound > 1 << shift:
        digit = ((keys[order] >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def lower_bound(scores: np.ndarray, m: int, axis: int = 1) -> np.ndarray:
    """A value that at least ``m`` entries of each row (axis=1) or column (axis=0) of 2-D ``scores`` reach.

    Returns (c,) float32 for (c, n) scores and axis=1, (n,) for axis=0;
    ``-inf`` where a line has fewer than ``m`` entries.
    """
    lines = scores.shape[1 - axis]
    n = scores.shape[axis]
    if n < m or m < 1:
        return np.full(lines, -np.inf, dtype=np.float32)
    group = max(1, min(_GROUP, n // (4 * m)))
    width = n // group  # group j holds entries j, j + width, j + 2 * width, ...; any partition works
    if axis == 1:
        gmax = scores[:, : group * width].reshape(lines, group, width).max(axis=1) if group > 1 else scores
        tail = scores[:, group * width :].max(axis=1, keepdims=True) if group * width < n else None
    else:
        gmax = scores[: group * width].reshape(group, width, lines).max(axis=0) if group > 1 else scores
        tail = scores[group * width :].max(axis=0, keepdims=True) if group * width < n else None
    if tail is not None:
        gmax = np.concatenate([gmax, tail], axis=axis)
    ng = gmax.shape[axis]
    return np.take(np.partition(gmax, ng - m, axis=axis), ng - m, axis=axis)


def candidates(scores: np.ndarray, bound: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of C-contiguous (c, n) ``scores`` that reach ``bound``.

    ``bound`` broadcasts against ``scores``: (c, 1) for one bound per row,
    (1, n) for one per column. Returns (rows, cols, values), row-major (rows
    ascending, columns ascending within a row). ``mask`` is an optional
    (c, n) bool scratch buffer.
    """
    n = scores.shape[1]
    mask = np.greater_equal(scores, bound, out=mask)
    flat = np.flatnonzero(mask)
    rows, cols = np.divmod(flat, n)
    return rows, cols, scores.reshape(-1)[flat]


def pad_groups(keys: np.ndarray, ids: np.ndarray, values: np.ndarray, pad_id: int, *, width: int = 0,
               n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged ``(key, id, value)`` triples, grouped by key (equal keys adjacent), as one padded row per key.

    Returns ``(keys (H,), values (H, W), ids (H, W) int64)``: the triples of each key in their
    order, then ``-inf`` values with id ``pad_id``; W = max(``width``, the longest group).
    Without ``n_rows``: one row per distinct key, in order (``keys`` must be non-empty). With
    ``n_rows``: ``keys`` are row numbers, ascending, and every row 0..n_rows-1 is returned (a row
    with no triple is all padding).
    """
    if n_rows is None:
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        counts = np.diff(np.r_[starts, keys.size])
        hit, row = keys[starts], np.repeat(np.arange(starts.size), counts)
        pos = np.arange(keys.size) - np.repeat(starts, counts)
    else:
        counts = np.bincount(keys, minlength=n_rows)
        starts = np.cumsum(counts) - counts
        hit, row = np.arange(n_rows), keys
        pos = np.arange(keys.size) - starts[keys]
    w = max(int(width), int(counts.max(initial=0)))
    padded = np.full((hit.size, w), -np.inf, dtype=values.dtype)
    padded_ids = np.full((hit.size, w), pad_id, dtype=np.int64)
    padded[row, pos], padded_ids[row, pos] = values, ids
    return hit, padded, padded_ids


def ragged_topk(rows: np.ndarray, ids: np.ndarray, values: np.ndarray, n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (value descending, then id ascending) of each row of a ragged list.

    ``rows`` must be ascending and ``ids`` ascending within each row (as
    :func:`candidates` returns them). Returns (values (n_rows, k), ids
    (n_rows, k) int64), best first, picked by
    :func:`~clipret.retrieval.ranking.topk_rows` so the tie rule is the shared
    one. A row with fewer than ``k`` entries ends in ``-inf`` values.
    """
    _, padded, padded_ids = pad_groups(rows, ids, values, 0, width=k, n_rows=n_rows)
    vals, where = topk_rows(padded, k)
    return vals, np.take_along_axis(padded_ids, where, axis=1)


def batch_knn(
    query: np.ndarray,
    gallery: np.ndarray,
    m: int,
    l: int,
    gallery_bound: np.ndarray,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """One exact pass of the (Q, D) queries over all Q+G items (ids: queries 0..Q-1, gallery Q..).

    Returns a dict of arrays:
      ``nb``, ``nb_scores``: (Q, min(m, Q+G)) each query's top m over all items;
      ``top``, ``top_scores``: (Q, min(l, G)) each query's top l gallery rows;
      ``min_scores``: (Q,) each query's smallest score over all items;
      ``gallery_min``: (G,) each gallery item's smallest score over the queries;
      ``pair_q``, ``pair_g``, ``pair_scores``: every (query, gallery row, score)
      whose score reaches ``gallery_bound`` (G,) of that gallery row.
    """
    nq, ng = query.shape[0], gallery.shape[0]
    m = min(m, nq + ng)
    l = min(l, ng)
    step = rows_per_block(nq + ng, chunk)
    c0 = min(step, nq)
    bq, bg = np.empty((c0, nq), np.float32), np.empty((c0, ng), np.float32)
    mq, mg = np.empty(bq.shape, bool), np.empty(bg.shape, bool)
    qt, gt = np.asarray(query).T, np.asarray(gallery).T
    out = {
        "nb": np.empty((nq, m), np.int64), "nb_scores": np.empty((nq, m), np.float32),
        "top": np.empty((nq, l), np.int64), "top_scores": np.empty((nq, l), np.float32),
        "min_scores": np.empty(nq, np.float32), "gallery_min": np.full(ng, np.inf, np.float32),
    }
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    col_bound = np.asarray(gallery_bound, np.float32)[None, :]
    for r0 in range(0, nq, step):
        x = np.ascontiguousarray(query[r0 : r0 + step], dtype=np.float32)
        c, sl = x.shape[0], slice(r0, r0 + x.shape[0])
        sq, sg = np.matmul(x, qt, out=bq[:c]), np.matmul(x, gt, out=bg[:c])
        out["min_scores"][sl] = np.minimum(sq.min(axis=1), sg.min(axis=1))
        np.minimum(out["gallery_min"], sg.min(axis=0), out=out["gallery_min"])
        # l >= m gallery entries reach the bound, so it also bounds the top m over all items; the first
        # columns suffice for a (looser) bound and cost a quarter of the pass
        bound = lower_bound(sg[:, : max(ng // 4, min(ng, 32 * l))], l) if l >= m else np.full(c, -np.inf, np.float32)
        rq, cq, vq = candidates(sq, bound[:, None], mq[:c])
        rg, cg, vg = candidates(sg, bound[:, None], mg[:c])
        out["top_scores"][sl], out["top"][sl] = ragged_topk(rg, cg, vg, c, l)
        rows, ids, vals = np.concatenate([rq, rg]), np.concatenate([cq, cg + nq]), np.concatenate([vq, vg])
        o = stable_order(rows, c)
        out["nb_scores"][sl], out["nb"][sl] = ragged_topk(rows[o], ids[o], vals[o], c, m)
        pr, pg, pv = candidates(sg, col_bound, mg[:c])
        pairs.append((pr + r0, pg, pv))
        if sum(p[0].size for p in pairs) > 4 * m * ng:  # keep memory O(G m), whatever the data
            pairs = [best_per_column(*(np.concatenate(a) for a in zip(*pairs)), m)]
        if on_progress is not None:
            on_progress(c)
    out["pair_q"], out["pair_g"], out["pair_scores"] = best_per_column(*(np.concatenate(a) for a in zip(*pairs)), m)
    return out


def best_per_column(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, for each column, its best ``m`` (value descending, then row ascending) of the (row, col, value) triples.

    The result is grouped by column (columns ascending).
    """
    order = np.lexsort((rows, -values, cols))
    rows, cols, values = rows[order], cols[order], values[order]
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]]) if cols.size else np.zeros(0, np.int64)
    rank = np.arange(cols.size) - np.repeat(starts, np.diff(np.r_[starts, cols.size]))
    keep = rank < m
    return rows[keep], cols[keep], values[keep]
