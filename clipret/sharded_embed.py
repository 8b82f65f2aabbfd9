"""The body of :func:`clipret.inference.embed_folder`: plan the shards, embed this rank's, merge.

Every rank runs :func:`run` with the same arguments. With one process the collectives are
local, and this is the plain single-process embedding.

1. Rank 0 lists the folder (with ``strict``, checks every image first: one bad file and
   nothing is embedded or written) and, with ``out``, prepares ``OUT.parts/``; the others get
   its ids, or stop with its error.
2. With ``--resume``, each rank checks a contiguous block of the shard files; the finished
   shards are gathered, and the shards still to do are split into contiguous blocks, one per
   rank (so a resumed run with any world size shares the remaining work evenly).
3. Each rank embeds its block, writing one shard file per shard (with ``out``).
4. Rank 0 merges every shard in id order: from its own memory, or from the files (with
   ``out``), or from the gathered arrays (without ``out``, on every rank).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipret import artifacts, distributed, runtime
from clipret.artifacts import Embeddings
from clipret.data.decode import decode_side_for
from clipret.embed_parts import discard_parts, load_shard, prepare_parts, reusable_shard, shard_path
from clipret.errors import ClipretError
from clipret.sharding import auto_shard_size, shard_bounds, split_contiguous
from clipret.tta import tta_transform

AMP_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}  # --amp as run.json records it


def run(folder: str | Path, model: str, pretrained: str | None, *, out: Path | None, shard_size: int | None, resume: bool,
        overwrite: bool, batch_size: int | None, workers: int | None, device: Any, amp: str, strict: bool, tta: str | None,
        dba: int, exact_decode: bool, on_start: Callable[[int], None] | None, on_batch: Callable[[int], None] | None,
        group: Any) -> Embeddings:
    """See :func:`clipret.inference.embed_folder`; ``group`` is :func:`clipret.distributed.work_group`'s."""
    from clipret.data.layout import scan_images
    from clipret.inference import default_batch_size, embed_shards
    from clipret.model.build import open_encoder

    rank, world = distributed.rank_and_world(group)
    autocast = runtime.resolve_amp(amp, device)

    def listing() -> tuple[list[str], list[dict[str, str]]]:
        ids, unlisted = scan_images(folder)
        if strict:
            check_all(folder, ids, unlisted, workers)
        return ids, unlisted

    ids, unlisted = distributed.from_main(listing, group)
    encoder, spec, fingerprint = open_encoder(model, pretrained)
    if len(set(distributed.gather(fingerprint, group))) > 1:
        distributed.fail_together(f"the ranks opened different models for {model} (different files on different nodes?); "
                                "give every node the same model folder and weights", group)

    parts: Path | None = None
    if out is not None:
        def prepare() -> tuple[Path, dict[str, Any]]:
            # the shards in OUT.parts/ and the merged file exist side by side for a moment
            artifacts.ensure_free_space(out, 2 * len(ids) * int(encoder.embed_dim) * 4 + (1 << 20), "the embeddings")
            settings = {"shard_size": shard_size, "batch_size": batch_size, "tta": tta, "exact_decode": bool(exact_decode),
                        "amp": AMP_NAMES[autocast], "device": device.type}
            automatic = {"shard_size": auto_shard_size(len(ids)), "batch_size": default_batch_size(device)}
            return prepare_parts(out, ids, fingerprint, settings, automatic, resume=resume, overwrite=overwrite)

        parts, chosen = distributed.from_main(prepare, group)
        size, batch_size = chosen["shard_size"], chosen["batch_size"]
    else:  # nothing to resume: one contiguous block of ids per rank
        size, batch_size = max(1, -(-len(ids) // world)), batch_size or default_batch_size(device)
    bounds = shard_bounds(len(ids), size)

    have: dict[int, Embeddings] = {}  # shards this rank holds in memory
    done: set[int] = set()
    if parts is not None and resume:
        for n in split_contiguous(len(bounds), world, rank):
            shard = reusable_shard(shard_path(parts, n), ids[slice(*bounds[n])], fingerprint)
            if shard is not None:
                have[n] = shard
        done = {n for ns in distributed.gather(sorted(have), group) for n in ns}
    pending = [n for n in range(len(bounds)) if n not in done]
    mine = [pending[i] for i in split_contiguous(len(pending), world, rank)]
    n_mine = sum(bounds[n][1] - bounds[n][0] for n in mine)
    reused = sum(len(e) + len(e.skipped) for e in have.values()) if world == 1 else 0
    if on_start is not None:
        on_start(n_mine + reused)
    if on_batch is not None and reused:
        on_batch(reused)

    def strict_failure(skipped: list[dict[str, str]]) -> str:
        """A file passed :func:`check_all` but not decoding: discard ``OUT.parts/`` (--strict writes
        nothing) and say why, in one line."""
        if parts is not None:
            discard_parts(parts)
        return strict_message(skipped)

    results = embed_shards(encoder, folder, ids, [bounds[n] for n in mine], tta_transform(spec.preprocess, tta),
                           batch_size=batch_size, workers=_loader_workers(workers, n_mine), device=device,
                           amp=autocast, decode_side=decode_side_for(spec.preprocess["size"], exact_decode),
                           on_batch=on_batch)
    for n, (vectors, kept, skipped) in zip(mine, results):
        if strict and skipped:
            raise ClipretError(strict_failure(skipped))
        have[n] = Embeddings(vectors, kept, fingerprint=fingerprint, skipped=skipped)
        if parts is not None:
            write_shard(parts, n, have[n], world)

    flags = {"model": str(model), "pretrained": spec.pretrained, "pool": spec.pool, "image_size": spec.preprocess.get("size"),
             "tta": tta, "dba": dba or None, "exact_decode": bool(exact_decode)}
    if parts is not None:
        owners = distributed.gather(mine, group)  # also: every rank's shard files are written
        if rank != 0:
            own = [have[n] for n in mine]
            return _join(own, fingerprint, {**flags, "dba": None}, [s for e in own for s in e.skipped])
        writer = {n: f"rank {r}" for r, ns in enumerate(owners) for n in ns}
        shards = [have.pop(n) if n in have else load_shard(parts, n, ids[slice(*bounds[n])], fingerprint, writer.get(n, "an earlier run"))
                  for n in range(len(bounds))]
    else:
        gathered = {n: e for got in distributed.gather(have, group) for n, e in got.items()}
        shards = [gathered[n] for n in range(len(bounds))]

    skipped = sorted(unlisted + [s for e in shards for s in e.skipped], key=lambda s: s["id"])
    if strict and skipped:
        distributed.fail_together(strict_failure(skipped), group)
    result = _join(shards, fingerprint, flags, skipped)
    result.root = Path(folder).resolve()
    if not len(result):
        distributed.fail_together(f"none of the {len(ids)} images in {folder} could be read (first: {skipped[0]['id']}: "
                                f"{skipped[0]['reason']})", group)
    if dba:
        from clipret.retrieval.pipeline import apply_dba

        result.vectors = apply_dba(result.vectors, dba)
    if out is not None and rank == 0:
        artifacts.save_embeddings(out, result.vectors, result.ids, fingerprint=fingerprint, flags=flags, skipped=skipped,
                                  root=result.root)
        shutil.rmtree(parts, ignore_errors=True)  # type: ignore[arg-type]
        result.path = out
    return result


def check_all(folder: str | Path, ids: list[str], unlisted: list[dict[str, str]], workers: int | None) -> None:
    """--strict, before anything is embedded: check every image as training does
    (:func:`clipret.data.validate.check_images`, cached) and raise one :class:`ClipretError` that
    counts every unreadable file (the ones a run without --strict skips) and names the first."""
    from clipret.data.validate import check_images

    bad = check_images(folder, ids, workers=max(1, runtime.resolve_workers(workers, len(ids))))
    unreadable = sorted(unlisted + [{"id": i, "reason": r} for i, r in bad.items()], key=lambda s: s["id"])
    if unreadable:
        raise ClipretError(strict_message(unreadable))


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
    def removed_by_peer() -> distributed.PeerError | None:
        return distributed.PeerError(f"another rank stopped and removed {parts}") if world > 1 and not parts.is_dir() else None

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
    if workers is not None:
        return chosen
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(chosen, max(1, runtime.available_cpus() // local_ranks))
