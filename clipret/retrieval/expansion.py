"""Query expansion (average QE, alpha-QE) and database-side augmentation (DBA).

Pure numpy over (N, D) float32 L2-normalised rows; never imports torch.

* Average QE: a query becomes the L2-normalised mean of itself and its top-N
  gallery neighbours, and is searched again.
* alpha-QE (Radenovic, Tolias, Chum, TPAMI 2018): the same, weighted. The
  query keeps weight 1; a neighbour with similarity s gets ``max(s, 0) ** alpha``.
  ``alpha = 0`` is average QE.
* DBA: every gallery vector becomes the (uniform, or alpha-weighted)
  normalised mean of itself and its top-N *other* gallery vectors, found
  with an exact self-search of the original gallery.

Neighbour lists are the ``(scores (Q, N), indices (Q, N))`` pairs a
:class:`~clipret.retrieval.search.Searcher` returns; an index of -1 (how
faiss pads a short list) is no neighbour and gets weight 0. A weighted sum
whose norm is 0 (impossible for unit inputs unless neighbours cancel the
item exactly) leaves the item unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipret.retrieval.search import ExactSearcher, Searcher
from clipret.retrieval.selfmatch import drop_rows

__all__ = ["average_qe", "alpha_qe", "expand_queries", "dba"]

_BLOCK_BYTES = 64 * 2**20  # gathered neighbour vectors held at once


def average_qe(query: np.ndarray, gallery: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """(Q, D) queries, (G, D) gallery, (Q, N) int neighbour indices -> (Q, D) float32 expanded queries.

    Each query is replaced by the L2-normalised sum of itself and its N
    neighbours (equal weights). N = 0 returns the queries unchanged.
    """
    neighbors = _check_neighbors(query, gallery, neighbors)
    return _expand(query, gallery, neighbors, np.ones(neighbors.shape, dtype=np.float32))


def alpha_qe(query: np.ndarray, gallery: np.ndarray, neighbors: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE: like :func:`average_qe`, neighbour j weighted by ``max(scores[:, j], 0) ** alpha``.

    scores: (Q, N) similarities of each query to its neighbours (the search
    scores). alpha >= 0; the query itself has weight 1.
    """
    neighbors = _check_neighbors(query, gallery, neighbors)
    return _expand(query, gallery, neighbors, _alpha_weights(scores, neighbors.shape, alpha))


def expand_queries(
    query: np.ndarray,
    gallery: np.ndarray,
    n: int,
    *,
    alpha: float | None = None,
    searcher: Searcher | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Search the top ``n`` gallery neighbours of each query and apply average QE (or alpha-QE).

    Returns (Q, D) float32 expanded queries; search them again for the final
    ranking. ``searcher`` defaults to exact search over ``gallery``, which
    may also be any object with ``shape``, ``ndim`` and ``gallery[rows]``
    (only the neighbours' rows are read). ``exclude`` (Q,) int64: a gallery
    row that is the query's own item (-1: none), never used as its neighbour.
    """
    n = _check_n(n)
    if n == 0:
        return np.array(query, dtype=np.float32, copy=True)
    searcher = searcher or ExactSearcher(gallery)
    if exclude is not None and (np.asarray(exclude) >= 0).any():
        scores, idx = drop_rows(*searcher.search(np.asarray(query, dtype=np.float32), n + 1), exclude, n)
    else:
        scores, idx = searcher.search(np.asarray(query, dtype=np.float32), n)
    if alpha is None:
        return average_qe(query, gallery, idx)
    return alpha_qe(query, gallery, idx, scores, alpha)


def dba(
    gallery: np.ndarray,
    n: int,
    *,
    alpha: float | None = None,
    searcher: Searcher | None = None,
    chunk: int = 4096,
    out: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Database-side augmentation: (G, D) gallery -> (G, D) float32 augmented gallery.

    Row i becomes the normalised weighted sum of row i (weight 1) and its
    top-``n`` neighbours among the *other* rows of the original gallery
    (weight 1, or ``max(s, 0) ** alpha`` when ``alpha`` is given). The
    neighbours come from a self-search for n + 1 items: the item itself is
    dropped from that list wherever the ranking put it (an exact duplicate
    with a lower index ranks first), or the last entry is dropped if the item
    is not in the list, so the item counts exactly once. ``n >= G`` uses all
    other rows; ``n = 0`` copies the gallery.

    Works ``chunk`` rows at a time; each row depends only on the original
    gallery, so the result does not depend on ``chunk``. ``out`` (G, D)
    float32, e.g. an ``np.memmap``, receives the result (it must not share
    memory with ``gallery``). ``searcher`` (same protocol as
    :class:`ExactSearcher`) defaults to exact search; its cost dominates:
    a full G x G similarity pass.
    """
    n = _check_n(n)
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ValueError(f"gallery must be a non-empty (G, D) array, got {gallery.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if alpha is not None:
        _check_alpha(alpha)
    g = gallery.shape[0]
    if out is None:
        out = np.empty(gallery.shape, dtype=np.float32)
    elif out.shape != gallery.shape or out.dtype != np.float32:
        raise ValueError(f"out must be a {gallery.shape} float32 array, got {out.dtype} {out.shape}")
    elif np.shares_memory(out, gallery):
        raise ValueError("out must not share memory with the gallery: DBA reads the original vectors")
    n = min(n, g - 1)
    searcher = searcher or ExactSearcher(gallery)
    for start in range(0, g, chunk):
        rows = np.asarray(gallery[start : start + chunk], dtype=np.float32)
        if n == 0:
            out[start : start + len(rows)] = rows
        else:
            scores, idx = drop_rows(*searcher.search(rows, n + 1), np.arange(start, start + len(rows)), n)
            weights = np.ones(idx.shape, np.float32) if alpha is None else _alpha_weights(scores, idx.shape, alpha)
            out[start : start + len(rows)] = _expand(rows, gallery, idx, weights)
        if on_progress is not None:
            on_progress(len(rows))
    return out


def _expand(base: np.ndarray, gallery: np.ndarray, neighbors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Normalised base + sum_j weights[:, j] * gallery[neighbors[:, j]], in row blocks."""
    base = np.asarray(base, dtype=np.float32)
    out = base.copy()
    q, m = neighbors.shape
    if m == 0:
        return out
    weights = np.where(neighbors >= 0, weights, 0).astype(np.float32)
    safe = np.where(neighbors >= 0, neighbors, 0)
    step = max(1, _BLOCK_BYTES // max(1, m * base.shape[1] * 4))
    for s in range(0, q, step):
        e = min(q, s + step)
        vecs = np.asarray(gallery[safe[s:e].ravel()], dtype=np.float32).reshape(e - s, m, -1)
        total = base[s:e] + np.einsum("qm,qmd->qd", weights[s:e], vecs)
        norm = np.linalg.norm(total, axis=1, keepdims=True)
        ok = norm[:, 0] > 0
        out[s:e][ok] = total[ok] / norm[ok]
    return out


def _alpha_weights(scores: np.ndarray, shape: tuple[int, ...], alpha: float) -> np.ndarray:
    _check_alpha(alpha)
    scores = np.asarray(scores)
    if scores.shape != shape:
        raise ValueError(f"scores must match the neighbours' shape {shape}, got {scores.shape}")
    return np.power(np.maximum(scores.astype(np.float32), 0), np.float32(alpha))


def _check_neighbors(query: np.ndarray, gallery: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    neighbors = np.asarray(neighbors)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) queries and a (G, D) gallery, got {query.shape} and {gallery.shape}")
    if neighbors.ndim != 2 or neighbors.shape[0] != query.shape[0] or (neighbors.size and neighbors.dtype.kind not in "iu"):
        raise ValueError(f"neighbors must be ({query.shape[0]}, N) ints, got {neighbors.dtype} {neighbors.shape}")
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= gallery.shape[0]):
        raise ValueError(f"neighbour indices must lie in [0, {gallery.shape[0]}) (or be -1 for none)")
    return neighbors.astype(np.int64, copy=False)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of neighbours must be an int >= 0, got {n!r}")
    return int(n)


def _check_alpha(alpha: float) -> None:
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
