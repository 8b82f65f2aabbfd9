"""The gallery's neighbour graph cache: ``gallery.npy.knn.npz`` next to the gallery.

k-reciprocal re-ranking needs every gallery item's nearest gallery items
(a G x G search, the expensive part, the same for every query batch). It is
written on first use and reused while it still matches the gallery.

The file is a plain ``np.savez`` archive (read back with
``allow_pickle=False``; no pickles) holding:

* ``format``: ``"clipret.knn/1"``;
* ``key``: the caller's string naming the gallery content (its manifest's
  content hash, plus anything else that changes the graph);
* ``count``, ``dim``: the gallery shape; ``method``: ``"exact"`` or the
  searcher that built it;
* ``indices`` (G, m) int32 gallery rows, best first; ``scores`` (G, m)
  float32; ``min_scores`` (G,) float32.

A file that is missing, unreadable, made for another key or shape, or too
short for the neighbours asked for is rebuilt and replaced (atomically),
never reused.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipret.artifacts.atomic import atomic_path

NEIGHBORS_FORMAT = "clipret.knn/1"
EXACT = "exact"  # the graph's ``method`` when built by exact search


@dataclass(frozen=True)
class GalleryGraph:
    """Each gallery item's nearest gallery items and its smallest similarity to any of them.

    indices: (G, m) int64 gallery rows, best first by the ranking rule (the
        item itself is normally first); m = min(neighbors needed, G).
    scores: (G, m) float32 cosine similarities matching ``indices``.
    min_scores: (G,) float32 each item's smallest similarity to any gallery
        item (its largest squared distance is 2 - 2 * min_score).
    dim: the embedding dimension the graph was built from.
    method: ``"exact"`` for the built-in exact search, else the searcher's
        class name (an approximate index gives an approximate graph).
    filled: rows the searcher returned short (fewer than m neighbours), whose
        lists came from exact search instead (not stored in the cache file).
    """

    indices: np.ndarray
    scores: np.ndarray
    min_scores: np.ndarray
    dim: int
    method: str = EXACT
    filled: int = 0

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])

    @property
    def neighbors(self) -> int:
        return int(self.indices.shape[1])

    def truncated(self, m: int) -> GalleryGraph:
        """The same graph keeping only the first ``m`` neighbours (lists are sorted, so still exact)."""
        m = min(m, self.count)
        if m > self.neighbors:
            raise ValueError(f"graph holds {self.neighbors} neighbours per item, {m} needed")
        return GalleryGraph(self.indices[:, :m], self.scores[:, :m], self.min_scores, self.dim, self.method, self.filled)

    def check(self, gallery: np.ndarray, m: int) -> None:
        """Raise ValueError unless this graph belongs to a gallery of this shape and holds ``m`` neighbours."""
        g, d = gallery.shape
        if self.count != g or self.dim != d:
            raise ValueError(f"graph was built for a ({self.count}, {self.dim}) gallery, got {gallery.shape}")
        if self.neighbors < min(m, g):
            raise ValueError(f"graph holds {self.neighbors} neighbours per item, {min(m, g)} needed")


def neighbors_path(gallery_path: str | os.PathLike[str]) -> Path:
    """``gallery.npy`` -> ``gallery.npy.knn.npz``."""
    p = Path(gallery_path)
    return p.with_name(p.name + ".knn.npz")


def save_gallery_graph(path: str | os.PathLike[str], graph: GalleryGraph, *, key: str) -> None:
    """Write ``graph`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            format=np.array(NEIGHBORS_FORMAT),
            key=np.array(key),
            method=np.array(graph.method),
            count=np.array(graph.count, dtype=np.int64),
            dim=np.array(graph.dim, dtype=np.int64),
            indices=graph.indices.astype(np.int32),
            scores=graph.scores.astype(np.float32),
            min_scores=graph.min_scores.astype(np.float32),
        )


def load_gallery_graph(
    path: str | os.PathLike[str], *, key: str, count: int, dim: int, neighbors: int, method: str = "exact"
) -> GalleryGraph | None:
    """The cached graph if ``path`` holds one for this key, shape and method with enough neighbours, else None.

    A graph built exactly also serves a request for a searcher-built one.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != NEIGHBORS_FORMAT or str(z["key"]) != key:
                return None
            stored_method = str(z["method"])
            if int(z["count"]) != count or int(z["dim"]) != dim or stored_method not in (method, EXACT):
                return None
            indices, scores, mins = z["indices"], z["scores"], z["min_scores"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    m = min(neighbors, count)
    if (
        indices.ndim != 2 or indices.shape[0] != count or indices.shape[1] < m
        or scores.shape != indices.shape or mins.shape != (count,)
        or indices.dtype != np.int32 or scores.dtype != np.float32 or mins.dtype != np.float32
        or (indices.size and (indices.min() < 0 or indices.max() >= count))
        or not (np.isfinite(scores).all() and np.isfinite(mins).all())
    ):
        return None
    return GalleryGraph(indices[:, :m].astype(np.int64), scores[:, :m], mins, dim, stored_method)
