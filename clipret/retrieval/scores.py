"""Score functions: (n, G) blocks of final scores over the whole gallery, for full-ranking evaluation.

A score function is called as ``score_fn(q0, q1)`` and returns the (q1 - q0, G) float32
scores of queries q0..q1-1 against every gallery row, higher is better. Each one writes into
a single (rows, G) buffer it reuses, so the block it returns must be read before the next
call; asking for more than ``rows`` queries at once is a ValueError.

The evaluation (:mod:`clipret.evaluation`) consumes them without knowing how the scores
were made; the pipeline (:func:`clipret.retrieval.pipeline.score_function`) picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clipret.retrieval.rerank.batch import RerankBatch

__all__ = ["ScoreFn", "matmul_scores", "rerank_scores"]

ScoreFn = Callable[[int, int], np.ndarray]
"""``score_fn(q0, q1) -> (q1 - q0, G)`` float scores of queries q0..q1-1, higher is better.

The returned block is read before the next call, so a score function may
reuse one output buffer.
"""


class _Block:
    """One reused (rows, G) float32 buffer; ``block.rows(q0, q1)`` is its first q1 - q0 rows."""

    def __init__(self, rows: int, n_gallery: int) -> None:
        self.buf = np.empty((max(1, rows), n_gallery), dtype=np.float32)

    def rows(self, q0: int, q1: int) -> np.ndarray:
        if q1 - q0 > self.buf.shape[0]:
            raise ValueError(f"asked for {q1 - q0} rows; this score function holds {self.buf.shape[0]}")
        return self.buf[: q1 - q0]


def matmul_scores(query: np.ndarray, gallery: np.ndarray, rows: int) -> ScoreFn:
    """Cosine scores ``query[q0:q1] @ gallery.T`` into one reused (rows, G) float32 buffer.

    query: (Q, D), gallery: (G, D) float32, L2-normalised; either may be a
    memory map (the gallery is then streamed from disk once per call).
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) queries and a (G, D) gallery, got {query.shape} and {gallery.shape}")
    g_t = np.asarray(gallery).T
    block = _Block(rows, gallery.shape[0])

    def score(q0: int, q1: int) -> np.ndarray:
        out = block.rows(q0, q1)
        q = np.ascontiguousarray(query[q0:q1], dtype=np.float32)
        return np.matmul(q, g_t, out=out)

    return score


def rerank_scores(batch: RerankBatch, rows: int) -> ScoreFn:
    """``1 - final distance`` of a prepared re-ranking batch
    (:class:`~clipret.retrieval.rerank.batch.RerankBatch`), into one reused (rows, G) float32 buffer."""
    block = _Block(rows, batch.n_gallery)

    def score(q0: int, q1: int) -> np.ndarray:
        d = batch.distance_block(q0, q1, out=block.rows(q0, q1))
        return np.subtract(np.float32(1), d, out=d)

    return score
