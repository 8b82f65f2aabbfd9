"""Score functions: (n, G) blocks of final scores over the whole gallery, for full-ranking evaluation.

A score function is called as ``score_fn(q0, q1)`` and returns the (q1 - q0, G) float32
scores of queries q0..q1-1 against every gallery row, higher is better. Each one writes into
a single (rows, G) buffer it reuses, so the block it returns must be read before the next
call; asking for more than ``rows`` queries at once is a ValueError.

The evaluation (:mod:`clipret.evaluation`) consumes them without knowing how the scores
were made; the pipeline (:func:`clipret.retrieval.pipeline.score_function`) picks one.

:func:`matmul_scores` runs on the GPU when :func:`~clipret.retrieval.search.search_device`
says so (a CUDA GPU and a large enough job, or ``CLIPRET_SEARCH_DEVICE=cuda``): the gallery
stays on the device, each block is one full-float32 torch matmul, copied back into a reused
page-locked buffer, or, with ``to_host=False`` (what the evaluation asks for), left on the device
as a torch tensor, where the evaluation counts its ranks. The blocks equal the CPU's up to float
rounding (~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from clipret.retrieval.search import exact_fp32, resident_gallery, search_device, stream_rows, to_device

if TYPE_CHECKING:
    from clipret.retrieval.rerank.batch import RerankBatch

__all__ = ["AUTO_MIN_SCORE_WORK", "ScoreFn", "device_matmul_scores", "matmul_scores", "rerank_scores"]

AUTO_MIN_SCORE_WORK = 1 << 34  # Q×G×D multiply-adds below which the automatic choice keeps the CPU

ScoreFn = Callable[[int, int], Any]
"""``score_fn(q0, q1) -> (q1 - q0, G)`` float scores of queries q0..q1-1, higher is better: a numpy
array, or a torch tensor on the device that made it where the caller asked for that (``to_host=False``).

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


def matmul_scores(query: np.ndarray, gallery: np.ndarray, rows: int, *, device: str | None = None,
                  to_host: bool = True) -> ScoreFn:
    """Cosine scores ``query[q0:q1] @ gallery.T`` into one reused (rows, G) float32 buffer.

    query: (Q, D), gallery: (G, D) float32, L2-normalised; either may be a
    memory map (the gallery is then streamed from disk once per call).
    ``device``: ``"cpu"`` (numpy), a torch device (:func:`device_matmul_scores`), or None:
    :func:`~clipret.retrieval.search.search_device` decides. ``to_host=False``: on a torch
    device the blocks are the device's tensors (for :func:`clipret.evaluation.evaluate_scores`,
    which then counts ranks there); on the CPU they are numpy arrays either way.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) queries and a (G, D) gallery, got {query.shape} and {gallery.shape}")
    if device is None:
        device = search_device(query.shape[0] * gallery.shape[0] * gallery.shape[1], min_work=AUTO_MIN_SCORE_WORK)
    if device != "cpu":
        return device_matmul_scores(query, gallery, rows, device, to_host=to_host)
    g_t = np.asarray(gallery).T
    block = _Block(rows, gallery.shape[0])

    def score(q0: int, q1: int) -> np.ndarray:
        out = block.rows(q0, q1)
        q = np.ascontiguousarray(query[q0:q1], dtype=np.float32)
        return np.matmul(q, g_t, out=out)

    return score


def device_matmul_scores(query: np.ndarray, gallery: np.ndarray, rows: int, device: str, *,
                         gallery_chunk: int | None = None, to_host: bool = True) -> ScoreFn:
    """:func:`matmul_scores` as torch matmuls on ``device``: the same (q1 - q0, G) float32 numpy blocks.

    The gallery is copied to a GPU once, at the first call, when it fits
    (:func:`~clipret.retrieval.search.resident_gallery`; not with ``gallery_chunk``); else it
    streams in blocks of ``gallery_chunk`` rows (default: 64 MiB) each call. Blocks are copied
    into one reused page-locked host buffer (on the CPU device, the block itself); with
    ``to_host=False`` the block stays where it is and is returned as a torch tensor.
    """
    import torch

    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Q, D) queries and a (G, D) gallery, got {query.shape} and {gallery.shape}")
    rows, g = max(1, int(rows)), gallery.shape[0]
    cuda = device.startswith("cuda")
    held: dict[str, Any] = {}

    def setup() -> None:
        held["gallery"] = resident_gallery(gallery, device) if gallery_chunk is None else None
        held["block"] = torch.empty((rows, g), dtype=torch.float32, device=device)
        held["host"] = torch.empty((rows, g), dtype=torch.float32, pin_memory=True) if cuda and to_host else held["block"]

    def score(q0: int, q1: int) -> np.ndarray:
        if q1 - q0 > rows:
            raise ValueError(f"asked for {q1 - q0} rows; this score function holds {rows}")
        with exact_fp32():
            if not held:
                setup()
            q, out = to_device(query[q0:q1], device), held["block"][: q1 - q0]
            if held["gallery"] is not None:
                torch.matmul(q, held["gallery"].T, out=out)
            else:
                width = gallery_chunk or stream_rows(gallery.shape[1])
                for g0 in range(0, g, width):
                    out[:, g0 : g0 + width] = q @ to_device(gallery[g0 : g0 + width], device).T
            if not to_host:
                return out
            host = held["host"][: q1 - q0]
            if cuda:
                host.copy_(out)
        return host.numpy()

    return score


def rerank_scores(batch: RerankBatch, rows: int) -> ScoreFn:
    """``1 - final distance`` of a prepared re-ranking batch
    (:class:`~clipret.retrieval.rerank.batch.RerankBatch`), into one reused (rows, G) float32 buffer."""
    block = _Block(rows, batch.n_gallery)

    def score(q0: int, q1: int) -> np.ndarray:
        d = batch.distance_block(q0, q1, out=block.rows(q0, q1))
        return np.subtract(np.float32(1), d, out=d)

    return score
