"""One process, images in batches -> rows: the encoder's forward passes over image files.

:func:`embed_shards` reads the ids of several shards (:mod:`clipret.parallel.shards`) through
one DataLoader and yields each shard's rows; :func:`embed_images` is the one-shard case. Every
shard is cut into batches from its own start, so its rows do not depend on who embeds it
(:mod:`clipret.embedding.sharded` builds resumable and multi-rank embedding on that).

Feeding a GPU (:func:`load_batches`): page-locked batches copied without blocking, more batches
prefetched per worker, and plain JPEGs decoded on the GPU (:mod:`clipret.embedding.gpu_decode`,
automatic on CUDA; the workers then only read bytes). On the CPU the loader is as before.
Persistent workers would not pay: one loader reads every shard, once. ``channels_last`` is not
applied: bench/embed.py --steady measures it (``--forward-variants``) before it is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from clipret.data.dataset import ImageFolderDataset, collate
from clipret.embedding.gpu_decode import EncodedImages, collate_encoded, device_decode_plan
from clipret.embedding.tta import average_views
from clipret.parallel.shards import shard_batches
from clipret.runtime import autocast

__all__ = ["CPU_BATCH", "CUDA_BATCH", "default_batch_size", "embed_images", "embed_shards", "load_batches", "tf32_matmuls"]

CPU_BATCH, CUDA_BATCH = 64, 256  # default images per forward pass
CUDA_PREFETCH = 4  # batches each loader worker keeps ready when feeding a GPU (torch's default: 2)


def default_batch_size(device: Any) -> int:
    """64 on the CPU; 256 on CUDA, where larger batches keep the GPU busy."""
    return CUDA_BATCH if torch.device(device).type == "cuda" else CPU_BATCH


@contextlib.contextmanager
def tf32_matmuls(device: Any) -> Iterator[None]:
    """Let float32 matmuls use TF32 on CUDA (``--amp none``, and the fp32 parts under autocast); restored on exit."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def embed_images(
    encoder: nn.Module,
    folder: str | Path,
    ids: Sequence[str],
    transform: Callable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: Any = "cpu",
    amp: Any = None,
    decode_side: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    gpu_decode: bool | None = None,
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed ``folder/id`` for every id, in id order.

    Returns ``(vectors, kept_ids, skipped)``: vectors is (N', D) float32 with
    unit rows, one per kept id. A transform that returns a (V, 3, H, W) stack
    per image (test-time augmentation, :mod:`clipret.embedding.tta`) gets its V view
    embeddings averaged and re-normalised; and ``skipped`` lists ``{"id", "reason"}`` for
    every file that could not be decoded. ``decode_side`` lets JPEGs decode at
    a reduced scale (see :func:`clipret.data.decode.load_rgb`). ``on_batch(n)`` is called with the
    number of files handled after each batch. ``gpu_decode``: decode JPEGs on ``device``
    (:mod:`clipret.embedding.gpu_decode`): True, False, or None (automatic; ``CLIPRET_GPU_DECODE``).
    """
    return next(embed_shards(encoder, folder, ids, [(0, len(ids))], transform, batch_size=batch_size, workers=workers,
                             device=device, amp=amp, decode_side=decode_side, on_batch=on_batch, gpu_decode=gpu_decode))


def embed_shards(
    encoder: nn.Module,
    folder: str | Path,
    ids: Sequence[str],
    bounds: Sequence[tuple[int, int]],
    transform: Callable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: Any = "cpu",
    amp: Any = None,
    decode_side: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    gpu_decode: bool | None = None,
) -> Iterator[tuple[np.ndarray, list[str], list[dict[str, str]]]]:
    """For each ``(start, stop)`` in ``bounds``, in order, yield what :func:`embed_images` returns
    for ``ids[start:stop]``: (N', D) float32 unit rows, the kept ids, the skipped ones.

    One DataLoader reads every shard (workers start once, and decode the next shard while this
    one is finished); each shard is cut into batches from its own start, so its rows do not
    depend on which other shards are read with it. Rows stay on the device until their shard is
    complete (one device-to-host copy per shard). Runs under ``torch.inference_mode``.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    batches = shard_batches(bounds, batch_size)
    owner = [k for k, (start, stop) in enumerate(bounds) for _ in range(start, stop, batch_size)]
    loader = load_batches(folder, ids, batches, transform, workers=workers, device=device, decode_side=decode_side,
                          gpu_decode=gpu_decode)
    dim = int(getattr(encoder, "embed_dim", 0))
    current, rows, kept, skipped = 0, [], [], []  # the shard being filled
    for k, batch in zip(owner, loader):
        while current < k:
            yield _finish(rows, kept, skipped, ids, dim)
            current, rows, kept, skipped = current + 1, [], [], []
        skipped.extend({"id": ids[index], "reason": reason} for index, reason in batch["errors"])
        n_good = len(batch["indices"])
        if n_good:
            rows.append(encode_batch(encoder, batch["images"], device, amp))
            kept.extend(batch["indices"].tolist())
        if on_batch is not None:
            on_batch(n_good + len(batch["errors"]))
    while current < len(bounds):
        yield _finish(rows, kept, skipped, ids, dim)
        current, rows, kept, skipped = current + 1, [], [], []


def load_batches(folder: str | Path, ids: Sequence[str], batches: Sequence[Sequence[int]], transform: Callable, *,
                 workers: int = 0, device: Any = "cpu", decode_side: int | None = None,
                 gpu_decode: bool | None = None) -> Iterator[dict[str, Any]]:
    """Decode and preprocess ``folder/ids[i]`` for each batch of indices, in order: yields
    ``{"images": (B', 3, H, W) float32 (or (B', V, 3, H, W)) on device or None, "indices": (B',) long,
    "errors": [(i, reason)]}``, the good images in index order and the files that could not be read.

    On CUDA decoded batches are page-locked and copied without blocking, each worker prefetches
    :data:`CUDA_PREFETCH` batches, and plain JPEGs are decoded on the device
    (:func:`clipret.embedding.gpu_decode.device_decode_plan`: automatic, ``gpu_decode`` or
    ``CLIPRET_GPU_DECODE`` force it; ``decode_side`` None, a full exact decode, keeps PIL).
    """
    device = torch.device(device)
    if not batches:
        return
    cuda = device.type == "cuda"
    pil = ImageFolderDataset(folder, ids, transform, decode_side=decode_side)
    plan = device_decode_plan(transform, device, exact=decode_side is None, choice=gpu_decode)
    loader = DataLoader(
        EncodedImages(pil) if plan is not None else pil,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_encoded if plan is not None else collate,
        pin_memory=cuda and plan is None,  # page-locked batches: their copies to the device run asynchronously
        prefetch_factor=CUDA_PREFETCH if cuda and workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched (resume exactness)
    )
    for batch in loader:
        if plan is not None:
            yield plan.finish(batch, device, fallback=pil.__getitem__)
        else:
            images = batch["images"]
            yield {**batch, "images": images.to(device, non_blocking=True) if images is not None else None}


def encode_batch(encoder: nn.Module, images: torch.Tensor, device: Any, amp: Any) -> torch.Tensor:
    """(B, 3, H, W) images, or (B, V, 3, H, W) test-time views -> (B, D) float32 L2-normalised rows
    (the V views' embeddings averaged), under ``torch.inference_mode`` and ``amp``'s autocast."""
    views = images.shape[1] if images.ndim == 5 else 0
    with torch.inference_mode():
        with autocast(device, amp):
            out = encoder(images.flatten(0, 1) if views else images)
        out = average_views(out.reshape(-1, views, out.shape[-1])) if views else out
        return torch.nn.functional.normalize(out.float(), dim=-1)


def _finish(rows: list[torch.Tensor], kept: list[int], skipped: list[dict[str, str]], ids: Sequence[str],
            dim: int) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    with torch.inference_mode():
        vectors = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, dim), dtype=np.float32)
    return vectors.astype(np.float32, copy=False), [ids[i] for i in kept], skipped
