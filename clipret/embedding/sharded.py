"""The body of :func:`clipret.embedding.folder.embed_folder`: plan the shards, embed this rank's, merge.

Every rank runs :func:`run` with the same arguments. With one process the collectives are
local, and this is the plain single-process embedding. The steps, in order:

1. :func:`list_folder`: rank 0 lists the folder (with ``strict``, checks every image first: one
   bad file and nothing is embedded or written); the others get its ids, or stop with its error.
2. :func:`open_same_model`: every rank opens the model; they must agree on its fingerprint.
3. :func:`plan_shards`: with ``out``, rank 0 prepares ``OUT.parts/`` and fixes the shard and
   batch sizes; without, each rank takes one contiguous block of ids.
4. :func:`share_shards`: with ``--resume``, each rank checks a contiguous block of the shard
   files; the finished shards are gathered, and the shards still to do are split into
   contiguous blocks, one per rank (so a resumed run with any world size shares the remaining
   work evenly).
5. :func:`embed_mine`: each rank embeds its block, writing one shard file per shard (with ``out``).
6. :func:`collect_shards` and :func:`merge_shards`: rank 0 merges every shard in id order: from
   its own memory, or from the files (with ``out``), or from the gathered arrays (without
   ``out``, on every rank); then DBA, and with ``out`` the file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipret import artifacts, runtime
from clipret.artifacts import Embeddings
from clipret.data.decode import decode_side_for
from clipret.progress import StageProgress, stage_counter
from clipret.data.sources import image_root, list_images_of
from clipret.data.validate import check_images
from clipret.embedding.batches import default_batch_size, embed_shards
from clipret.embedding.gpu_decode import decode_choice, device_decode_plan
from clipret.embedding.parts import discard_parts, load_shard, prepare_parts, reusable_shard, shard_path
from clipret.embedding.tta import tta_transform
from clipret.errors import ClipretError
from clipret.model.build import open_encoder
from clipret.parallel import groups
from clipret.parallel.shards import auto_shard_size, shard_bounds, split_contiguous
from clipret.retrieval.pipeline import apply_dba

AMP_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}  # --amp as run.json records it


@dataclass
class Job:
    """What the steps of :func:`run` share; the same on every rank but ``rank``."""

    folder: str | Path
    ids: list[str]
    unlisted: list[dict[str, str]]  # files listed but not images the decoder takes
    fingerprint: str
    bounds: list[tuple[int, int]]  # shard n covers ids[start:stop]
    batch_size: int
    parts: Path | None  # OUT.parts/ with ``out``; None without (nothing to resume)
    strict: bool
    group: Any  # clipret.parallel.groups.work_group's
    rank: int
    world: int

    def shard_ids(self, n: int) -> list[str]:
        return self.ids[slice(*self.bounds[n])]


def run(folder: str | Path, model: str, pretrained: str | None, *, out: Path | None, shard_size: int | None, resume: bool,
        overwrite: bool, batch_size: int | None, workers: int | None, device: Any, amp: str, strict: bool, tta: str | None,
        dba: int, exact_decode: bool, on_start: Callable[[int], None] | None, on_batch: Callable[[int], None] | None,
        group: Any, opened: tuple[Any, Any, str] | None = None, rows: str | None = None, decode: str = "auto",
        on_check: StageProgress | None = None) -> Embeddings:
    """See :func:`clipret.embedding.folder.embed_folder`; ``group`` is :func:`clipret.parallel.groups.work_group`'s."""
    rank, world = groups.rank_and_world(group)
    autocast = runtime.resolve_amp(amp, device)
    ids, unlisted = groups.from_main(lambda: list_folder(folder, strict, workers, rows, on_check), group)
    folder = image_root(folder)
    encoder, spec, fingerprint = open_same_model(model, pretrained, group, opened)
    transform = tta_transform(spec.preprocess, tta)
    decode_side = decode_side_for(spec.preprocess["size"], exact_decode)
    on_device = device_decode_plan(transform, device, exact=decode_side is None, choice=decode_choice(decode)) is not None
    settings = {"shard_size": shard_size, "batch_size": batch_size, "tta": tta, "exact_decode": bool(exact_decode),
                "amp": AMP_NAMES[autocast], "device": device.type, "decode": "gpu" if on_device else "pil"}
    parts, size, batch_size = plan_shards(out, ids, int(encoder.embed_dim), fingerprint, settings, device, resume=resume,
                                          overwrite=overwrite, world=world, group=group)
    job = Job(folder, ids, unlisted, fingerprint, shard_bounds(len(ids), size), batch_size, parts, strict, group, rank, world)

    have, mine = share_shards(job, resume)
    n_mine = sum(job.bounds[n][1] - job.bounds[n][0] for n in mine)
    reused = sum(len(e) + len(e.skipped) for e in have.values()) if world == 1 else 0
    if on_start is not None:
        on_start(n_mine + reused)
    if on_batch is not None and reused:
        on_batch(reused)
    embed_mine(job, mine, have, encoder, transform, workers=_loader_workers(workers, n_mine), device=device,
               autocast=autocast, decode_side=decode_side, gpu_decode=on_device, on_batch=on_batch)

    flags = {"model": str(model), "pretrained": spec.pretrained, "pool": spec.pool, "image_size": spec.preprocess.get("size"),
             "tta": tta, "dba": dba or None, "exact_decode": bool(exact_decode)}
    shards = collect_shards(job, mine, have)
    if shards is None:  # with ``out``, a rank other than 0 returns the rows it embedded (no DBA)
        own = [have[n] for n in mine]
        return _join(own, fingerprint, {**flags, "dba": None}, [s for e in own for s in e.skipped])
    return merge_shards(job, shards, flags, dba, out)


def list_folder(folder: str | Path, strict: bool, workers: int | None, rows: str | None = None,
                on_check: StageProgress | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The image ids under ``folder`` and the files that are not images; with ``strict``, every image
    checked (reported to ``on_check`` as stage ``"check"``).

    ``folder`` may be a dataset CSV (:mod:`clipret.data.dataset_csv`): its ``rows`` (default
    ``gallery``), ids relative to the CSV's folder."""
    ids, unlisted = list_images_of(folder, rows)
    if strict:
        check_all(image_root(folder), ids, unlisted, workers, on_check)
    return ids, unlisted


def open_same_model(model: str, pretrained: str | None, group: Any,
                    opened: tuple[Any, Any, str] | None = None) -> tuple[Any, Any, str]:
    """:func:`clipret.model.build.open_encoder` on every rank (or the model each rank already
    ``opened``: (module, spec, fingerprint)); the ranks must open the same model."""
    encoder, spec, fingerprint = opened if opened is not None else open_encoder(model, pretrained)
    if len(set(groups.gather(fingerprint, group))) > 1:
        groups.fail_together(f"the ranks opened different models for {model} (different files on different nodes?); "
                             "give every node the same model folder and weights", group)
    return encoder, spec, fingerprint


def plan_shards(out: Path | None, ids: list[str], dim: int, fingerprint: str, settings: dict[str, Any], device: Any, *,
                resume: bool, overwrite: bool, world: int, group: Any) -> tuple[Path | None, int, int]:
    """``(OUT.parts/ or None, ids per shard, images per batch)``, the same on every rank.

    With ``out``, rank 0 prepares ``OUT.parts/`` (:func:`clipret.embedding.parts.prepare_parts`),
    which fixes the sizes left None in ``settings``; without, one contiguous block of ids per rank.
    """
    if out is None:  # nothing to resume: one contiguous block of ids per rank
        return None, max(1, -(-len(ids) // world)), settings["batch_size"] or default_batch_size(device)

    def prepare() -> tuple[Path, dict[str, Any]]:
        # the shards in OUT.parts/ and the merged file exist side by side for a moment
        artifacts.ensure_free_space(out, 2 * len(ids) * dim * 4 + (1 << 20), "the embeddings")
        automatic = {"shard_size": auto_shard_size(len(ids)), "batch_size": default_batch_size(device)}
        return prepare_parts(out, ids, fingerprint, settings, automatic, resume=resume, overwrite=overwrite)

    parts, chosen = groups.from_main(prepare, group)
    return parts, chosen["shard_size"], chosen["batch_size"]


def share_shards(job: Job, resume: bool) -> tuple[dict[int, Embeddings], list[int]]:
    """``(have, mine)``: the finished shards this rank found (``--resume``: each rank checks a
    contiguous block of the files), and the shards it embeds: its contiguous block of those that
    no rank found finished."""
    have: dict[int, Embeddings] = {}  # shards this rank holds in memory
    done: set[int] = set()
    if job.parts is not None and resume:
        for n in split_contiguous(len(job.bounds), job.world, job.rank):
            shard = reusable_shard(shard_path(job.parts, n), job.shard_ids(n), job.fingerprint)
            if shard is not None:
                have[n] = shard
        done = {n for ns in groups.gather(sorted(have), job.group) for n in ns}
    pending = [n for n in range(len(job.bounds)) if n not in done]
    return have, [pending[i] for i in split_contiguous(len(pending), job.world, job.rank)]


def embed_mine(job: Job, mine: list[int], have: dict[int, Embeddings], encoder: Any, transform: Callable, *, workers: int,
               device: Any, autocast: Any, decode_side: int | None, gpu_decode: bool, on_batch: Callable[[int], None] | None) -> None:
    """Embed the shards ``mine`` into ``have``, writing each one's file (with ``out``) as it is done.
    With ``--strict``, an image that does not decode stops the run (:func:`discard_strict_run`)."""
    results = embed_shards(encoder, job.folder, job.ids, [job.bounds[n] for n in mine], transform,
                           batch_size=job.batch_size, workers=workers, device=device, amp=autocast,
                           decode_side=decode_side, gpu_decode=gpu_decode, on_batch=on_batch)
    for n, (vectors, kept, skipped) in zip(mine, results):
        if job.strict and skipped:
            raise ClipretError(discard_strict_run(job.parts, skipped))
        have[n] = Embeddings(vectors, kept, fingerprint=job.fingerprint, skipped=skipped)
        if job.parts is not None:
            write_shard(job.parts, n, have[n], job.world)


def collect_shards(job: Job, mine: list[int], have: dict[int, Embeddings]) -> list[Embeddings] | None:
    """Every shard, in order: on rank 0 from its memory or the files (with ``out``; None on the
    other ranks), or gathered in memory on every rank (without ``out``)."""
    if job.parts is None:
        gathered = {n: e for got in groups.gather(have, job.group) for n, e in got.items()}
        return [gathered[n] for n in range(len(job.bounds))]
    owners = groups.gather(mine, job.group)  # also: every rank's shard files are written
    if job.rank != 0:
        return None
    writer = {n: f"rank {r}" for r, ns in enumerate(owners) for n in ns}
    return [have.pop(n) if n in have else load_shard(job.parts, n, job.shard_ids(n), job.fingerprint,
                                                     writer.get(n, "an earlier run"))
            for n in range(len(job.bounds))]


def merge_shards(job: Job, shards: list[Embeddings], flags: dict[str, Any], dba: int, out: Path | None) -> Embeddings:
    """The shards as one result (every unreadable file listed; ``--strict`` fails on one), DBA
    applied; with ``out``, rank 0 writes it and removes ``OUT.parts/``."""
    skipped = sorted(job.unlisted + [s for e in shards for s in e.skipped], key=lambda s: s["id"])
    if job.strict and skipped:
        groups.fail_together(discard_strict_run(job.parts, skipped), job.group)
    result = _join(shards, job.fingerprint, flags, skipped)
    result.root = Path(job.folder).resolve()
    if not len(result):
        groups.fail_together(f"none of the {len(job.ids)} images in {job.folder} could be read (first: {skipped[0]['id']}: "
                             f"{skipped[0]['reason']})", job.group)
    if dba:
        result.vectors = apply_dba(result.vectors, dba)
    if out is not None and job.rank == 0:
        artifacts.save_embeddings(out, result.vectors, result.ids, fingerprint=job.fingerprint, flags=flags,
                                  skipped=skipped, root=result.root)
        shutil.rmtree(job.parts, ignore_errors=True)  # type: ignore[arg-type]
        result.path = out
    return result


def check_all(folder: str | Path, ids: list[str], unlisted: list[dict[str, str]], workers: int | None,
              on_progress: StageProgress | None = None) -> None:
    """--strict, before anything is embedded: check every image as training does
    (:func:`clipret.data.validate.check_images`, cached; ``on_progress("check", done, total)``) and
    raise one :class:`ClipretError` that counts every unreadable file (the ones a run without
    --strict skips) and names the first."""
    if on_progress is not None:
        on_progress("check", 0, len(ids))
    bad = check_images(folder, ids, workers=max(1, runtime.resolve_workers(workers, len(ids))),
                       on_progress=stage_counter(on_progress, "check", len(ids)))
    unreadable = sorted(unlisted + [{"id": i, "reason": r} for i, r in bad.items()], key=lambda s: s["id"])
    if unreadable:
        raise ClipretError(strict_message(unreadable))


def discard_strict_run(parts: Path | None, unreadable: list[dict[str, str]]) -> str:
    """An image passed :func:`check_all` but did not decode: remove ``OUT.parts/`` (--strict
    writes nothing, not even progress) and return the one-line error to raise."""
    if parts is not None:
        discard_parts(parts)
    return strict_message(unreadable)


def strict_message(unreadable: list[dict[str, str]], shown: int = 3) -> str:
    """``N image(s) could not be read (the first few, with reasons); nothing written (--strict)...``"""
    first = "; ".join(f"{s['id']}: {s['reason']}" for s in unreadable[:shown])
    more = f"; +{len(unreadable) - shown} more" if len(unreadable) > shown else ""
    return (f"{len(unreadable)} image(s) could not be read ({first}{more}); nothing written (--strict): "
            "fix or remove them, or leave out --strict to skip them")


def _join(shards: list[Embeddings], fingerprint: str, flags: dict[str, Any], skipped: list[dict[str, str]]) -> Embeddings:
    """Shards in order as one :class:`Embeddings` (rows and ids concatenated)."""
    dim = shards[0].dim if shards else 0
    vectors = np.concatenate([np.asarray(e.vectors) for e in shards]) if shards else np.zeros((0, dim), np.float32)
    return Embeddings(vectors, [i for e in shards for i in e.ids], fingerprint=fingerprint, flags=flags, skipped=skipped)


def write_shard(parts: Path, n: int, shard: Embeddings, world: int) -> None:
    """Write shard ``n`` into ``parts``. Under several ranks, ``parts`` missing (before the write
    or during it) means another rank failed ``--strict`` and removed it (:func:`discard_parts`):
    :class:`PeerError`, so that rank's error is the only one printed, and the folder is not made
    again. With one process there is no peer: a write error is this run's own."""
    def removed_by_peer() -> groups.PeerError | None:
        return groups.PeerError(f"another rank stopped and removed {parts}") if world > 1 and not parts.is_dir() else None

    if (gone := removed_by_peer()) is not None:  # before the write: do not recreate it
        raise gone
    try:
        artifacts.save_embeddings(shard_path(parts, n), shard.vectors, shard.ids, fingerprint=shard.fingerprint,
                                  skipped=shard.skipped, mkdir=world == 1)
    except ClipretError:
        if (gone := removed_by_peer()) is not None:  # removed between the check and the write
            raise gone from None
        raise


def _loader_workers(workers: int | None, n_images: int) -> int:
    """``--workers`` as given, else the automatic choice, shared among the ranks on this node."""
    chosen = runtime.resolve_workers(workers, n_images)
    return chosen if workers is not None else min(chosen, runtime.cpus_per_rank())
