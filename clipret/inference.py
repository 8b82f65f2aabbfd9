"""Embed image files with an encoder: batched, robust to bad files, ids kept aligned.

:func:`embed_folder` runs the same way on one process or on every rank under torchrun: the ids
are cut into shards (:mod:`clipret.sharding`), each rank embeds a contiguous block of them, and
the parts are merged in id order (through ``OUT.parts/`` files with ``out``, see
:mod:`clipret.embed_parts`; in memory without).
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

from clipret import distributed
from clipret.artifacts import Embeddings
from clipret.data.dataset import ImageFolderDataset, collate
from clipret.runtime import autocast
from clipret.sharding import shard_batches
from clipret.tta import average_views, parse_tta

CPU_BATCH, CUDA_BATCH = 64, 256  # default images per forward pass


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
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed ``folder/id`` for every id, in id order.

    Returns ``(vectors, kept_ids, skipped)``: vectors is (N', D) float32 with
    unit rows, one per kept id. A transform that returns a (V, 3, H, W) stack
    per image (test-time augmentation, :mod:`clipret.tta`) gets its V view
    embeddings averaged and re-normalised; and ``skipped`` lists ``{"id", "reason"}`` for
    every file that could not be decoded. ``decode_side`` lets JPEGs decode at
    a reduced scale (see :func:`clipret.data.decode.load_rgb`). ``on_batch(n)`` is called with the
    number of files handled after each batch.
    """
    return next(embed_shards(encoder, folder, ids, [(0, len(ids))], transform, batch_size=batch_size, workers=workers,
                             device=device, amp=amp, decode_side=decode_side, on_batch=on_batch))


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
    loader: Any = []
    if batches:
        loader = DataLoader(
            ImageFolderDataset(folder, ids, transform, decode_side=decode_side),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",  # page-locked batches: the copy below runs asynchronously
            generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched (resume exactness)
        )
    dim = int(getattr(encoder, "embed_dim", 0))
    current, rows, kept, skipped = 0, [], [], []  # the shard being filled
    for k, batch in zip(owner, loader):
        while current < k:
            yield _finish(rows, kept, skipped, ids, dim)
            current, rows, kept, skipped = current + 1, [], [], []
        skipped.extend({"id": ids[index], "reason": reason} for index, reason in batch["errors"])
        n_good = len(batch["indices"])
        if n_good:
            images = batch["images"].to(device, non_blocking=True)
            views = images.shape[1] if images.ndim == 5 else 0
            with torch.inference_mode():
                with autocast(device, amp):
                    out = encoder(images.flatten(0, 1) if views else images)
                out = average_views(out.reshape(-1, views, out.shape[-1])) if views else out
                rows.append(torch.nn.functional.normalize(out.float(), dim=-1))
            kept.extend(batch["indices"].tolist())
        if on_batch is not None:
            on_batch(n_good + len(batch["errors"]))
    while current < len(bounds):
        yield _finish(rows, kept, skipped, ids, dim)
        current, rows, kept, skipped = current + 1, [], [], []


def _finish(rows: list[torch.Tensor], kept: list[int], skipped: list[dict[str, str]], ids: Sequence[str],
            dim: int) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    with torch.inference_mode():
        vectors = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, dim), dtype=np.float32)
    return vectors.astype(np.float32, copy=False), [ids[i] for i in kept], skipped


def embed_folder(
    folder: str | Path,
    model: str,
    pretrained: str | None = None,
    *,
    out: str | Path | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    amp: str = "auto",
    strict: bool = False,
    tta: str | None = None,
    dba: int = 0,
    exact_decode: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Embeddings:
    """List, decode and embed every image under ``folder`` with ``model``.

    ``model`` is a trained run folder or an open_clip name/config (zero-shot
    CLIP embedding with ``pretrained`` weights). With ``strict``, every image is checked
    first (:func:`clipret.data.validate.check_images`): any that cannot be decoded raises
    :class:`ClipretError` naming the count and the first few, and nothing is embedded or written.
    ``batch_size`` defaults to 256 on CUDA, 64 on the CPU.

    With ``out`` (a .npy path) the result is also written there with its
    manifest, and progress is kept in shards of ``shard_size`` ids under
    ``OUT.parts/`` (default: :func:`clipret.sharding.auto_shard_size`): with ``resume``,
    finished shards of an interrupted run are reused and only missing ones are embedded. They
    must match: the same model fingerprint, the same ids, and every setting that changes a row
    (:data:`clipret.embed_parts.ROW_SETTINGS`: --tta, --exact-decode, the batch size, the amp
    dtype, the device type), else :class:`ClipretError`; ``shard_size`` and ``batch_size`` left
    None take the interrupted run's. Every shard is embedded in the same batches whoever embeds
    it, so the merged result is identical to an uninterrupted run. Without ``resume``, finished
    shards of an interrupted run are an error unless ``overwrite`` (start again). The parts
    folder is removed once ``out`` is written.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 lists the folder, each rank
    embeds a contiguous block of the shards still to do, and rank 0 merges them. Rank 0
    returns the whole result; with ``out`` it alone writes ``out`` (after DBA) and the
    other ranks return the rows they embedded (no DBA); without ``out`` every rank returns
    the whole result (gathered in memory: each rank takes one contiguous block of ids).
    ``on_start(n)`` gets the number of images this rank will handle.
    """
    from clipret import runtime

    dev = runtime.resolve_device(device)  # under torchrun: this rank's own GPU
    with distributed.process_group(dev), distributed.work_group() as group, tf32_matmuls(dev):
        from clipret.sharded_embed import run

        return run(folder, model, pretrained, out=Path(out) if out is not None else None, shard_size=shard_size,
                   resume=resume, overwrite=overwrite, batch_size=batch_size, workers=workers, device=dev, amp=amp,
                   strict=strict, tta=parse_tta(tta), dba=dba, exact_decode=exact_decode, on_start=on_start,
                   on_batch=on_batch, group=group)
