"""Exact cosine top-k search, chunked so memory stays bounded.

Search hides behind one small interface, :class:`Searcher`, so an index
(FAISS flat/HNSW/IVF) can replace the exact search without touching callers.
Results are neighbour lists: ``(scores (Q, k), indices (Q, k))``, best
first, which is also what later post-processing (re-ranking, query
expansion) consumes.

On a GPU, :class:`TorchSearcher` runs the same exact search as blocked torch
matmuls on the device, with the same tie rule (:mod:`~clipret.retrieval.ranking`);
:func:`search_device` says where exact search and score blocks run (``--search-device``, through
:func:`searching_on`, or ``CLIPRET_SEARCH_DEVICE``).
torch is imported only when a GPU is there, or asked for: on a machine without an NVIDIA
driver nothing changes (numpy or FAISS, and no torch import).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipret.errors import ClipretError
from clipret.retrieval.ranking import merge_topk, sort_neighbors, topk_rows

SEARCH_DEVICE_ENV = "CLIPRET_SEARCH_DEVICE"
AUTO_MIN_WORK = 1 << 24  # auto: a job whose work (as its caller measures it) is smaller stays on the CPU
BLOCK_BYTES = 256 * 2**20  # one (queries, gallery rows) float32 score block on the device
RESIDENT_FRACTION = 0.5  # the gallery stays on the GPU when it takes at most this part of its free memory
STREAM_BYTES = 64 * 2**20  # gallery rows copied to the device at once when it does not stay there
_CHOSEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("clipret_search_device", default=None)


def stream_rows(dim: int) -> int:
    """Gallery rows of width ``dim`` (float32) in one :data:`STREAM_BYTES` block."""
    return max(1, STREAM_BYTES // (4 * max(1, int(dim))))


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


def search_device(work: int | None = None, *, min_work: int = AUTO_MIN_WORK) -> str:
    """Where exact search and score blocks run: ``"cpu"`` (numpy / FAISS) or a torch CUDA device.

    The choice is what :func:`searching_on` set (``--search-device``, ``search_device=``), else
    ``CLIPRET_SEARCH_DEVICE``: ``cpu``, ``cuda`` (or ``cuda:N``; an error without a GPU), or
    ``auto`` (the default): CUDA when torch sees a GPU and the job's ``work`` (a size the caller
    states, e.g. G×D) is at least ``min_work``, else the CPU. Without an NVIDIA driver (and torch
    not yet imported) auto answers ``"cpu"`` without importing torch.
    """
    chosen = _CHOSEN.get()
    if chosen is not None:
        value, said = chosen, f"--search-device {chosen}"
    else:
        value = os.environ.get(SEARCH_DEVICE_ENV, "").strip().lower() or "auto"
        said = f"{SEARCH_DEVICE_ENV}={value}"
        check_search_device(value, said=SEARCH_DEVICE_ENV)
    if value == "cpu":
        return "cpu"
    if value == "auto":
        if (work is not None and work < min_work) or not (_nvidia_driver() or "torch" in sys.modules):
            return "cpu"
        import torch

        return _cuda_device("cuda") if torch.cuda.is_available() else "cpu"
    import torch

    if not torch.cuda.is_available():
        raise ClipretError(f"{said} but torch sees no CUDA GPU; use cpu or auto")
    count = torch.cuda.device_count()
    if value.startswith("cuda:") and int(value[5:]) >= count:
        raise ClipretError(f"{said} but torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return _cuda_device(value)


def check_search_device(value: str, *, said: str = "--search-device") -> str:
    """``value`` lower-cased if it names a search device (auto, cpu, cuda or cuda:N), else a
    one-line :class:`ClipretError` naming where it came from (``said``). Imports nothing."""
    clean = value.strip().lower()
    if clean in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", clean):
        return clean
    raise ClipretError(f"{said} {value!r} is not understood; use auto, cpu, cuda or cuda:N")


@contextlib.contextmanager
def searching_on(device: str | None) -> Iterator[None]:
    """Within the block, :func:`search_device` answers from ``device`` (auto, cpu, cuda, cuda:N)
    instead of ``CLIPRET_SEARCH_DEVICE``; None changes nothing. Per thread and task (a ContextVar)."""
    if device is None:
        yield
        return
    token = _CHOSEN.set(check_search_device(device))
    try:
        yield
    finally:
        _CHOSEN.reset(token)


def _nvidia_driver() -> bool:
    """An NVIDIA driver on this machine (a cheap file check, no torch import), and GPUs not hidden."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in {"", "-1"}:
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def _cuda_device(value: str) -> str:
    """``cuda`` -> this process's own GPU (``cuda:LOCAL_RANK`` under torchrun); ``cuda:N`` as given."""
    from clipret.runtime import resolve_device

    return str(resolve_device(value))


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32, which other stages may have turned on), no autograd."""
    import torch

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_float32_matmul_precision(saved)


def to_device(rows: np.ndarray, device: str) -> Any:
    """(n, D) rows (a memory map slice, say) -> a float32 torch tensor on ``device``.

    Read-only rows (a memory map opened read-only) are copied on their way: to a GPU that copy is
    the upload itself (torch's warning about a non-writable array does not apply); on the CPU
    device they are copied first, so the tensor never shares read-only memory."""
    import torch

    array = np.ascontiguousarray(rows, dtype=np.float32)
    if array.flags.writeable:
        return torch.from_numpy(array).to(device)
    if not str(device).startswith("cuda"):
        return torch.from_numpy(array.copy()).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


def resident_gallery(gallery: np.ndarray, device: str, chunk: int = 65536) -> Any:
    """The whole (G, D) gallery as a float32 tensor on ``device`` (copied chunk by chunk, so a memory
    map is never held twice), or None when it would take more than :data:`RESIDENT_FRACTION` of the
    GPU's free memory. On the CPU device, None (the rows are read block by block)."""
    import torch

    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if gallery.shape[0] * gallery.shape[1] * 4 > RESIDENT_FRACTION * free:
        return None
    out = torch.empty(tuple(gallery.shape), dtype=torch.float32, device=device)
    for g0 in range(0, gallery.shape[0], chunk):
        out[g0 : g0 + chunk] = to_device(gallery[g0 : g0 + chunk], device)
    return out


def topk_tensor(scores: Any, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~clipret.retrieval.ranking.topk_rows` of an (n, g) torch score block, on its device.

    ``torch.topk`` picks the k best values but breaks ties either way; a row whose k-th value is
    tied with values left out is re-selected with a stable descending sort (ties: lower index
    first). The (n, k') lists come back to numpy, ordered by the ranking rule, indices + ``offset``.
    """
    import torch

    n, g = scores.shape
    k = min(int(k), g)
    if k >= g:
        vals, part = scores, torch.arange(g, device=scores.device).expand(n, g)
    else:
        vals, part = torch.topk(scores, k, dim=1)
        kth = vals[:, -1:]
        straddle = torch.nonzero((scores == kth).sum(1) > (vals == kth).sum(1)).flatten()
        if straddle.numel():
            fixed = torch.sort(scores[straddle], dim=1, descending=True, stable=True)
            vals, part = vals.clone(), part.clone()
            vals[straddle], part[straddle] = fixed.values[:, :k], fixed.indices[:, :k]
    return sort_neighbors(vals.cpu().numpy(), part.cpu().numpy().astype(np.int64) + offset)


class TorchSearcher:
    """Exact inner-product top-k as blocked torch matmuls on ``device`` (a CUDA GPU; the CPU device
    works too, for tests): the same results as :class:`ExactSearcher` and the same tie rule.

    The gallery is copied to the GPU once, at the first search, when it fits
    (:func:`resident_gallery`); else it streams in blocks of ``gallery_chunk`` rows and the lists
    are merged with :func:`~clipret.retrieval.ranking.merge_topk`. Score blocks are at most
    ``block_bytes``. Near-ties: the GPU rounds a dot product differently from numpy in the last
    bit, so two gallery items whose scores differ by ~1e-7 may swap places (as with FAISS);
    matmuls run in full float32 (no TF32).
    """

    exact = True

    def __init__(self, gallery: np.ndarray, *, device: str = "cuda", gallery_chunk: int | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:
        if gallery.ndim != 2 or gallery.shape[0] == 0:
            raise ValueError(f"gallery must be a non-empty (G, D) array, got {gallery.shape}")
        self.gallery, self.device = gallery, str(device)
        self.gallery_chunk, self.block_bytes = gallery_chunk, int(block_bytes)
        self._resident: Any = None  # the gallery on the device, after the first search (if it fits)
        self._checked = False

    def search(self, queries: np.ndarray, k: int, on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 -> (scores (Q, k') float32, indices (Q, k') int64), k' = min(k, G), best first."""
        if queries.ndim != 2 or queries.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"queries {queries.shape} do not match gallery dim {self.gallery.shape[1]}")
        g = self.gallery.shape[0]
        k = max(0, min(int(k), g))
        out_s = np.empty((queries.shape[0], k), dtype=np.float32)
        out_i = np.empty((queries.shape[0], k), dtype=np.int64)
        if k == 0 or not len(queries):
            return out_s, out_i
        with exact_fp32():
            if not self._checked and self.gallery_chunk is None:
                self._resident, self._checked = resident_gallery(self.gallery, self.device), True
            width = g if self._resident is not None else (self.gallery_chunk or stream_rows(self.gallery.shape[1]))
            width = min(width, g)
            step = max(1, self.block_bytes // (4 * width))
            for q0 in range(0, queries.shape[0], step):
                q = to_device(queries[q0 : q0 + step], self.device)
                best = None
                for g0 in range(0, g, width):
                    block = self._resident[g0 : g0 + width] if self._resident is not None else \
                        to_device(self.gallery[g0 : g0 + width], self.device)
                    found = topk_tensor(q @ block.T, k, offset=g0)
                    best = found if best is None else merge_topk(best, found, k)
                out_s[q0 : q0 + len(q)], out_i[q0 : q0 + len(q)] = best  # type: ignore[misc]
                if on_chunk is not None:
                    on_chunk(len(q))
        return out_s, out_i
