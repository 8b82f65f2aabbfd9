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
from clipret.data.decode import decode_side_for
from clipret.errors import ClipretError
from clipret.runtime import autocast
from clipret.tta import average_views, parse_tta, tta_transform


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
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    loader = DataLoader(
        ImageFolderDataset(folder, ids, transform, decode_side=decode_side),
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
            images = batch["images"].to(device, non_blocking=True)
            views = images.shape[1] if images.ndim == 5 else 0
            with autocast(device, amp):
                out = encoder(images.flatten(0, 1) if views else images)
            out = average_views(out.reshape(-1, views, out.shape[-1])) if views else out
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
    out: str | Path | None = None,
    shard_size: int = 8192,
    resume: bool = False,
    batch_size: int = 64,
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
    CLIP embedding with ``pretrained`` weights). With ``strict``, any image
    that cannot be decoded raises :class:`ClipretError` and nothing is written.

    With ``out`` (a .npy path) the result is also written there with its
    manifest, and progress is kept in shards of ``shard_size`` ids under
    ``OUT.parts/``: with ``resume``, finished shards of an interrupted run
    (same model fingerprint, same ids) are reused and only missing ones are
    embedded. Both runs embed the same shards in the same batches, so the
    merged result is identical to an uninterrupted run. The parts folder is
    removed once ``out`` is written.
    """
    import shutil

    from clipret import artifacts, runtime
    from clipret.data.layout import scan_images
    from clipret.model.build import open_encoder

    ids, unlisted = scan_images(folder)
    if strict and unlisted:
        raise ClipretError(f"{len(unlisted)} image(s) cannot be used (first: {unlisted[0]['id']}: {unlisted[0]['reason']}); "
                           "nothing written (--strict)")
    encoder, spec, fingerprint = open_encoder(model, pretrained)
    if out is not None:
        # the shards in OUT.parts/ and the merged file exist side by side for a moment
        artifacts.ensure_free_space(out, 2 * len(ids) * int(encoder.embed_dim) * 4 + (1 << 20), "the embeddings")
    tta = parse_tta(tta)
    parts = _prepare_parts(Path(out), ids, fingerprint, shard_size, resume, tta) if out is not None else None
    workers = runtime.resolve_workers(workers, len(ids))
    dev = runtime.resolve_device(device)
    amp_dtype = runtime.resolve_amp(amp, dev)
    transform = tta_transform(spec.preprocess, tta)
    decode_side = decode_side_for(spec.preprocess["size"], exact_decode)
    if on_start is not None:
        on_start(len(ids))

    def fail_strict(skipped: list[dict[str, str]]) -> None:
        if parts is not None:
            shutil.rmtree(parts, ignore_errors=True)
        first = skipped[0]
        raise ClipretError(f"{len(skipped)} image(s) could not be read (first: {first['id']}: {first['reason']}); nothing written (--strict)")

    shards: list[Embeddings] = []
    for n, start in enumerate(range(0, len(ids), shard_size)):
        shard_ids = ids[start : start + shard_size]
        path = parts / f"shard-{n:06d}.npy" if parts is not None else None
        done = _reusable_shard(path, shard_ids, fingerprint) if path is not None and resume else None
        if done is not None:
            if on_batch is not None:
                on_batch(len(shard_ids))
            shards.append(done)
            continue
        vectors, kept, skipped = embed_images(encoder, folder, shard_ids, transform, batch_size=batch_size,
                                              workers=workers, device=dev, amp=amp_dtype, decode_side=decode_side,
                                              on_batch=on_batch)
        if strict and skipped:
            fail_strict(skipped)
        if path is not None:
            artifacts.save_embeddings(path, vectors, kept, fingerprint=fingerprint, skipped=skipped)
        shards.append(Embeddings(vectors, kept, fingerprint=fingerprint, skipped=skipped))

    skipped = sorted(unlisted + [s for e in shards for s in e.skipped], key=lambda s: s["id"])
    kept = [i for e in shards for i in e.ids]
    if strict and skipped:
        fail_strict(skipped)
    if not kept:
        raise ClipretError(f"none of the {len(ids)} images in {folder} could be read (first: {skipped[0]['id']}: {skipped[0]['reason']})")
    vectors = np.concatenate([np.asarray(e.vectors) for e in shards])
    if dba:
        from clipret.retrieval.pipeline import apply_dba

        vectors = apply_dba(vectors, dba)
    flags = {"model": str(model), "pretrained": spec.pretrained, "pool": spec.pool, "image_size": spec.preprocess.get("size"),
             "tta": tta, "dba": dba or None,
             "exact_decode": bool(exact_decode)}
    result = Embeddings(vectors, kept, fingerprint=fingerprint, flags=flags, skipped=skipped)
    if out is not None and runtime.is_main():
        artifacts.save_embeddings(out, vectors, kept, fingerprint=fingerprint, flags=flags, skipped=skipped)
        shutil.rmtree(parts, ignore_errors=True)
        result.path = Path(out)
    return result


def _prepare_parts(out: Path, ids: Sequence[str], fingerprint: str, shard_size: int, resume: bool, tta: str | None) -> Path:
    """Create (or, with ``resume``, check and keep) the ``OUT.parts`` progress folder."""
    import shutil

    from clipret import artifacts

    parts = out.with_name(out.name + ".parts")
    info = {"fingerprint": fingerprint, "shard_size": shard_size, "n_ids": len(ids),
            "ids_sha256": artifacts.ids_digest(ids), "tta": tta}
    if parts.is_dir():
        previous = artifacts.read_json(parts / "run.json", "partial-run manifest") if (parts / "run.json").is_file() else None
        if not resume:
            shutil.rmtree(parts)
        elif previous != info:
            raise ClipretError(f"{parts} holds partial results of another model, folder, --tta or --shard-size; "
                               "delete it, or run without --resume")
    parts.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(parts / "run.json", info)
    return parts


def _reusable_shard(path: Path, shard_ids: Sequence[str], fingerprint: str) -> Embeddings | None:
    """A finished shard from an earlier run, if it covers exactly ``shard_ids`` with this model."""
    from clipret import artifacts

    if not path.is_file() or not artifacts.manifest_path(path).is_file():
        return None
    try:
        shard = artifacts.load_embeddings(path, mmap=False)
    except ClipretError:
        return None
    covered = sorted(shard.ids + [s["id"] for s in shard.skipped])
    if shard.fingerprint != fingerprint or covered != sorted(shard_ids):
        return None
    return shard
