"""Exact cosine top-k search, chunked so memory stays bounded.

Search hides behind one small interface, :class:`Searcher`, so an index
(FAISS flat/HNSW/IVF) can replace the exact search without touching callers.
Results are neighbour lists: ``(scores (Q, k), indices (Q, k))``, best
first, which is also what later post-processing (re-ranking, query
expansion) consumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from clipret.retrieval.ranking import merge_topk, topk_rows


class Searcher(Protocol):
    """Top-k search over a gallery. ``exact`` says whether results are the exact top k (brute
    force) or an index's approximation; re-ranking builds its gallery graph exactly itself
    when the searcher is exact, and through the searcher otherwise."""

    exact: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 -> (scores (Q, k) float32, indices (Q, k) int64), best first."""
        ...


class ExactSearcher:
    """Brute-force inner-product search over an (G, D) gallery (may be a memory map).

    Memory is bounded by ``query_chunk * gallery_chunk`` scores at a time, so a
    gallery of millions of rows streams from disk.
    """

    exact = True

    def __init__(self, gallery: np.ndarray, *, query_chunk: int = 1024, gallery_chunk: int = 65536) -> None:
        if gallery.ndim != 2 or gallery.shape[0] == 0:
            raise ValueError(f"gallery must be a non-empty (G, D) array, got {gallery.shape}")
        self.gallery = gallery
        self.query_chunk = query_chunk
        self.gallery_chunk = gallery_chunk

    def search(
        self,
        queries: np.ndarray,
        k: int,
        on_chunk: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if queries.ndim != 2 or queries.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"queries {queries.shape} do not match gallery dim {self.gallery.shape[1]}")
        g = self.gallery.shape[0]
        k = min(k, g)
        out_s = np.empty((queries.shape[0], k), dtype=np.float32)
        out_i = np.empty((queries.shape[0], k), dtype=np.int64)
        for q0 in range(0, queries.shape[0], self.query_chunk):
            q = np.ascontiguousarray(queries[q0 : q0 + self.query_chunk], dtype=np.float32)
            best = topk_rows(q @ np.asarray(self.gallery[: self.gallery_chunk], dtype=np.float32).T, k)
            for g0 in range(self.gallery_chunk, g, self.gallery_chunk):
                block = np.asarray(self.gallery[g0 : g0 + self.gallery_chunk], dtype=np.float32)
                best = merge_topk(best, topk_rows(q @ block.T, k, offset=g0), k)
            out_s[q0 : q0 + len(q)], out_i[q0 : q0 + len(q)] = best
            if on_chunk is not None:
                on_chunk(len(q))
        return out_s, out_i
