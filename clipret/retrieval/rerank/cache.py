"""The re-ranking graph of a gallery, from its cache file when that still matches, else built and cached."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from clipret.artifacts.neighbors import EXACT, GalleryGraph, load_gallery_graph, save_gallery_graph
from clipret.errors import ClipretError
from clipret.retrieval.rerank.graph import build_gallery_graph, graph_neighbors
from clipret.retrieval.search import Searcher

__all__ = ["cached_gallery_graph"]


def cached_gallery_graph(
    gallery: np.ndarray,
    path: str | os.PathLike[str] | None,
    *,
    key: str,
    k1: int = 20,
    k2: int = 6,
    searcher: Searcher | None = None,
    chunk: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_save_error: Callable[[ClipretError], None] | None = None,
) -> tuple[GalleryGraph, bool]:
    """The (G, m) graph of the (G, D) ``gallery`` from ``path`` when it matches, else built and written there.

    ``key`` names the gallery content (for example the manifest's content
    hash); a different key means a different gallery. Returns (graph,
    reused): ``reused`` is False when the graph was (re)built. With ``path`` None it is built
    and not cached. A failed write raises, or goes to ``on_save_error`` (work on uncached).
    """
    count, dim = (int(s) for s in gallery.shape)
    method = EXACT if searcher is None else type(searcher).__name__
    if path is not None:
        graph = load_gallery_graph(path, key=key, count=count, dim=dim, neighbors=graph_neighbors(k1, k2), method=method)
        if graph is not None:
            return graph, True
    graph = build_gallery_graph(gallery, k1=k1, k2=k2, searcher=searcher, chunk=chunk, on_progress=on_progress)
    if path is not None:
        try:
            save_gallery_graph(path, graph, key=key)
        except ClipretError as exc:
            if on_save_error is None:
                raise
            on_save_error(exc)
    return graph, False
