"""Self-matches: a query that is also in the gallery is never its own hit.

The metric-learning benchmarks (CUB-200, Cars-196, Stanford Online Products)
use one test set as both the queries and the gallery. Each query's own item
is then left out of its ranking and out of its R, as pytorch-metric-learning's
``AccuracyCalculator(..., ref_includes_query=True)`` does.

"The same item" means (:func:`self_matches`):

* the same row, when the query and gallery are the same embeddings (the same
  file, or equal ids over equal content);
* else the same source file: the id resolved under the folder each manifest
  records (``root``).

The result is a (Q,) int64 array: the gallery row of each query's own item,
or -1. Everything downstream takes that array: :func:`drop_rows` removes
those rows from neighbour lists, and the evaluation leaves them out of the
ranking and of R.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["Items", "Recorded", "self_matches", "drop_rows", "count", "RULE"]

RULE = "the same source file, or the same row of the same embeddings"


class Items(Protocol):
    """What :func:`self_matches` reads of a query set or gallery (Embeddings and Gallery have it)."""

    ids: Sequence[str]
    path: Path | None
    root: Path | None
    content: str | None


@dataclass
class Recorded:
    """One side as a results sidecar records it (:func:`clipret.retrieval.compat.describe`), with its ids."""

    ids: Sequence[str]
    path: Path | None = None
    root: Path | None = None
    content: str | None = None

    @classmethod
    def from_sidecar(cls, ids: Sequence[str], side: Mapping[str, Any] | None) -> Recorded:
        side = side or {}
        path, root, content = side.get("path"), side.get("root"), side.get("content_blake2b")
        return cls(ids, Path(path) if isinstance(path, str) and path.endswith(".npy") else None,
                   Path(root) if isinstance(root, str) else None, content if isinstance(content, str) else None)


def self_matches(query: Items, gallery: Items) -> np.ndarray:
    """(Q,) int64: the gallery row holding each query's own item, or -1.

    Rows when both sides are the same embeddings; otherwise ids resolved
    under each side's ``root`` (a symlinked file or folder counts as its
    target). Without a root on either side, nothing is known to match: all -1.
    """
    q_ids, g_ids = list(query.ids), list(gallery.ids)
    out = np.full(len(q_ids), -1, dtype=np.int64)
    if _same_embeddings(query, gallery, q_ids, g_ids):
        out[:] = np.arange(len(q_ids))
        return out
    if query.root is None or gallery.root is None:
        return out
    if _real(query.root) == _real(gallery.root):  # the same folder: the same id is the same file
        q_keys, g_keys = q_ids, g_ids
    else:
        q_keys = [_real(query.root / i) for i in q_ids]
        g_keys = [_real(gallery.root / i) for i in g_ids]
    row: dict[str, int] = {}
    for j, key in enumerate(g_keys):
        row.setdefault(key, j)
    for i, key in enumerate(q_keys):
        out[i] = row.get(key, -1)
    return out


def _same_embeddings(query: Items, gallery: Items, q_ids: list[str], g_ids: list[str]) -> bool:
    if q_ids != g_ids:
        return False
    if query.path is not None and gallery.path is not None and _real(query.path) == _real(gallery.path):
        return True
    return query.content is not None and query.content == gallery.content


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def count(exclude: np.ndarray | None) -> int:
    """How many queries have their own item in the gallery."""
    return 0 if exclude is None else int(np.count_nonzero(np.asarray(exclude) >= 0))


def drop_rows(scores: np.ndarray, idx: np.ndarray, exclude: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's excluded row from its neighbour list and keep the first ``n`` of the rest.

    scores (Q, L) float32, idx (Q, L) int64, best first (-1: no neighbour);
    exclude (Q,) int64 gallery rows (-1: none). Returns (scores (Q, n'),
    idx (Q, n')) with n' = min(n, L), the order of the rest kept, and a list
    left shorter than n' padded with (-inf, -1) at the end. Search n + 1
    neighbours, then call this, to get n that never include the query's own
    item.
    """
    exclude = np.asarray(exclude, dtype=np.int64)
    if idx.ndim != 2 or scores.shape != idx.shape or exclude.shape != (idx.shape[0],):
        raise ValueError(f"need (Q, L) scores and indices and (Q,) exclude, got {scores.shape}, {idx.shape}, {exclude.shape}")
    n = min(int(n), idx.shape[1])
    gone = (idx == exclude[:, None]) & (exclude[:, None] >= 0)
    order = np.argsort(gone, axis=1, kind="stable")[:, :n]  # kept entries first, in their order
    out_s = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    out_i = np.take_along_axis(idx, order, axis=1)
    padded = np.take_along_axis(gone, order, axis=1)
    out_s[padded], out_i[padded] = -np.inf, -1
    return out_s, out_i
