"""Embed a folder of image files: :func:`embed_folder`, the one entry point of ``clipret embed``.

It runs the same way on one process or on every rank under torchrun: the ids are cut into
shards (:mod:`clipret.parallel.shards`), each rank embeds a contiguous block of them, and the
parts are merged in id order (through ``OUT.parts/`` files with ``out``, see
:mod:`clipret.embedding.parts`; in memory without). The steps are in
:mod:`clipret.embedding.sharded`; this module sets up the process group around them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipret import runtime
from clipret.artifacts import Embeddings
from clipret.embedding.batches import tf32_matmuls
from clipret.embedding.sharded import run
from clipret.embedding.tta import parse_tta
from clipret.parallel import groups
from clipret.progress import StageProgress

__all__ = ["embed_folder"]


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
    opened: tuple[Any, Any, str] | None = None,
    rows: str | None = None,
    decode: str = "auto",
    on_check: StageProgress | None = None,
) -> Embeddings:
    """List, decode and embed every image under ``folder`` with ``model``.

    ``model`` is a trained run folder or an open_clip name/config (zero-shot
    CLIP embedding with ``pretrained`` weights). With ``strict``, every image is checked
    first (:func:`clipret.data.validate.check_images`): any that cannot be decoded raises
    :class:`ClipretError` naming the count and the first few, and nothing is embedded or written.
    ``batch_size`` defaults to 256 on CUDA, 64 on the CPU.

    With ``out`` (a .npy path) the result is also written there with its
    manifest, and progress is kept in shards of ``shard_size`` ids under
    ``OUT.parts/`` (default: :func:`clipret.parallel.shards.auto_shard_size`): with ``resume``,
    finished shards of an interrupted run are reused and only missing ones are embedded. They
    must match: the same model fingerprint, the same ids, and every setting that changes a row
    (:data:`clipret.embedding.parts.ROW_SETTINGS`: --tta, --exact-decode, the batch size, the amp
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
    ``on_start(n)`` gets the number of images this rank will handle; ``on_check(stage, done, total)``
    follows the ``strict`` check (stage ``"check"``, on the rank that lists the folder).

    ``folder`` may be a dataset CSV: its ``rows`` (``gallery``, ``query``, ``validation``,
    ``train`` or ``all``; default ``gallery``) are embedded, ids relative to the CSV's folder.
    ``decode``: how JPEGs are decoded, ``auto`` (nvJPEG on the GPU when the device is CUDA and it works,
    else PIL in the loader workers), ``gpu`` or ``pil`` (:mod:`clipret.embedding.gpu_decode`); the path
    taken is a row setting for ``resume``.
    ``opened``: the model already opened on this rank, (module, spec, fingerprint) as
    :func:`clipret.model.build.open_encoder` returns it (an :class:`~clipret.Encoder`'s).
    """
    dev = runtime.resolve_device(device)  # under torchrun: this rank's own GPU
    with groups.process_group(dev), groups.work_group() as group, tf32_matmuls(dev):
        return run(folder, model, pretrained, out=Path(out) if out is not None else None, shard_size=shard_size,
                   resume=resume, overwrite=overwrite, batch_size=batch_size, workers=workers, device=dev, amp=amp,
                   strict=strict, tta=parse_tta(tta), dba=dba, exact_decode=exact_decode, on_start=on_start,
                   on_batch=on_batch, group=group, opened=opened, rows=rows, decode=decode, on_check=on_check)
