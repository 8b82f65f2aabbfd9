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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipret.artifacts.atomic import atomic_path

if TYPE_CHECKING:  # the retrieval modules load only when a graph is read or built
    from clipret.retrieval.rerank.graph import GalleryGraph
    from clipret.retrieval.search import Searcher

NEIGHBORS_FORMAT = "clipret.knn/1"


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
    from clipret.retrieval.rerank.graph import EXACT, GalleryGraph

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


def cached_gallery_graph(
    gallery: np.ndarray,
    path: str | os.PathLike[str],
    *,
    key: str,
    k1: int = 20,
    k2: int = 6,
    searcher: Searcher | None = None,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[GalleryGraph, bool]:
    """The gallery's graph from ``path`` when it matches, else built and written there.

    ``key`` names the gallery content (for example the manifest's content
    hash); a different key means a different gallery. Returns (graph,
    reused): ``reused`` is False when the graph was (re)built.
    """
    from clipret.retrieval.rerank.graph import (
        EXACT,
        build_gallery_graph,
        graph_neighbors,
    )

    count, dim = (int(s) for s in gallery.shape)
    method = EXACT if searcher is None else type(searcher).__name__
    graph = load_gallery_graph(path, key=key, count=count, dim=dim, neighbors=graph_neighbors(k1, k2), method=method)
    if graph is not None:
        return graph, True
    graph = build_gallery_graph(gallery, k1=k1, k2=k2, searcher=searcher, chunk=chunk, on_progress=on_progress)
    save_gallery_graph(path, graph, key=key)
    return graph, False
