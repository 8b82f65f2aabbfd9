"""Embed image files with an encoder: batched, robust to bad files, ids kept aligned."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from clipret.artifacts import Embeddings
from clipret.data.dataset import ImageFolderDataset, collate
from clipret.errors import ClipretError
from clipret.runtime import autocast


@torch.no_grad()
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
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed ``folder/id`` for every id, in id order.

    Returns ``(vectors, kept_ids, skipped)``: vectors is (N', D) float32 with
    unit rows, one per kept id, and ``skipped`` lists ``{"id", "reason"}`` for
    every file that could not be decoded. ``on_batch(n)`` is called with the
    number of files handled after each batch.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    loader = DataLoader(
        ImageFolderDataset(folder, ids, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched (resume exactness)
    )
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    for batch in loader:
        for index, reason in batch["errors"]:
            skipped.append({"id": ids[index], "reason": reason})
        n_good = len(batch["indices"])
        if n_good:
            with autocast(device, amp):
                out = encoder(batch["images"].to(device, non_blocking=True))
            chunks.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy())
            kept.extend(batch["indices"].tolist())
        if on_batch is not None:
            on_batch(n_good + len(batch["errors"]))
    dim = int(getattr(encoder, "embed_dim", 0))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    return vectors.astype(np.float32, copy=False), [ids[i] for i in kept], skipped


def embed_folder(
    folder: str | Path,
    model: str,
    pretrained: str | None = None,
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    amp: str = "auto",
    strict: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Embeddings:
    """List, decode and embed every image under ``folder`` with ``model``.

    ``model`` is a trained run folder or an open_clip name/config (zero-shot
    CLIP embedding with ``pretrained`` weights). With ``strict``, any image
    that cannot be decoded raises :class:`ClipretError` instead of being skipped.
    """
    from clipret import runtime
    from clipret.data.layout import list_images
    from clipret.data.transforms import eval_transform
    from clipret.model.build import open_encoder

    ids = list_images(folder)
    encoder, spec, fingerprint = open_encoder(model, pretrained)
    dev = runtime.resolve_device(device)
    if on_start is not None:
        on_start(len(ids))
    vectors, kept, skipped = embed_images(
        encoder, folder, ids, eval_transform(spec.preprocess), batch_size=batch_size, workers=workers,
        device=dev, amp=runtime.resolve_amp(amp, dev), on_batch=on_batch,
    )
    if strict and skipped:
        first = skipped[0]
        raise ClipretError(f"{len(skipped)} image(s) could not be read (first: {first['id']}: {first['reason']}); nothing written (--strict)")
    if not kept:
        raise ClipretError(f"none of the {len(ids)} images in {folder} could be read (first: {skipped[0]['id']}: {skipped[0]['reason']})")
    flags = {"model": str(model), "pretrained": spec.pretrained, "pool": spec.pool, "image_size": spec.preprocess.get("size")}
    return Embeddings(vectors, kept, fingerprint=fingerprint, flags=flags, skipped=skipped)
