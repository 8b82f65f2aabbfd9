"""``OUT.parts/``: the progress folder of ``clipret embed --out OUT``.

It holds ``run.json`` (model fingerprint, shard size, id count and digest, --tta) and one
``shard-NNNNNN.npy`` + ``.json`` pair per finished shard (the embeddings format of
:mod:`clipret.artifacts.embeddings`: rows of kept ids, and the skipped ones). Under torchrun
every rank writes its own shards here and rank 0 merges them, so with several nodes ``OUT``
must lie on a file system every node shares.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from clipret import artifacts
from clipret.artifacts import Embeddings
from clipret.errors import ClipretError
from clipret.sharding import auto_shard_size

__all__ = ["discard_parts", "load_shard", "parts_dir", "prepare_parts", "reusable_shard", "shard_path"]


def parts_dir(out: Path) -> Path:
    """``x.npy`` -> ``x.npy.parts``."""
    return out.with_name(out.name + ".parts")


def shard_path(parts: Path, n: int) -> Path:
    return parts / f"shard-{n:06d}.npy"


def discard_parts(parts: Path) -> None:
    """Remove ``parts`` as one step, then its contents: it is first renamed to a hidden sibling.

    Other ranks may be writing shards into ``parts`` at that moment. After the rename their
    writes fail on the missing folder (and :func:`clipret.sharded_embed.write_shard` tells them a
    peer removed it), rather than racing a half-done ``rmtree``. A folder already gone is fine.
    """
    trash = parts.with_name(f".{parts.name}.removed-{os.getpid()}")
    try:
        os.replace(parts, trash)
    except FileNotFoundError:
        return
    except OSError:  # cannot rename (odd file systems): remove in place
        trash = parts
    with contextlib.suppress(OSError):
        shutil.rmtree(trash)


def prepare_parts(out: Path, ids: Sequence[str], fingerprint: str, shard_size: int | None, resume: bool,
                  tta: str | None) -> tuple[Path, int]:
    """Create (or, with ``resume``, check and keep) ``OUT.parts``; return it and the shard size.

    ``shard_size=None`` picks :func:`clipret.sharding.auto_shard_size`, or on ``resume`` the size
    the interrupted run recorded (so it is reused whatever changed in between: the world size,
    the batch size, the clipret version's automatic choice).
    """
    parts = parts_dir(out)
    info = {"fingerprint": fingerprint, "n_ids": len(ids), "ids_sha256": artifacts.ids_digest(ids), "tta": tta}
    if parts.is_dir():
        previous = artifacts.read_json(parts / "run.json", "partial-run manifest") if (parts / "run.json").is_file() else None
        if resume and shard_size is None and isinstance(previous, dict) and isinstance(previous.get("shard_size"), int):
            shard_size = previous["shard_size"]
        if not resume:
            shutil.rmtree(parts)
        elif previous != {**info, "shard_size": shard_size or auto_shard_size(len(ids))}:
            raise ClipretError(f"{parts} holds partial results of another model, folder, --tta or --shard-size; "
                               "delete it, or run without --resume")
    shard_size = shard_size or auto_shard_size(len(ids))
    parts.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(parts / "run.json", {**info, "shard_size": shard_size})
    return parts, shard_size


def reusable_shard(path: Path, shard_ids: Sequence[str], fingerprint: str) -> Embeddings | None:
    """A finished shard at ``path``, if it covers exactly ``shard_ids`` with this model."""
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


def load_shard(parts: Path, n: int, shard_ids: Sequence[str], fingerprint: str, writer: str) -> Embeddings:
    """Shard ``n`` for the merge (``writer`` says who wrote it: "rank 1"); a missing one is a user error."""
    shard = reusable_shard(shard_path(parts, n), shard_ids, fingerprint)
    if shard is None:
        raise ClipretError(f"{shard_path(parts, n)}, written by {writer}, is missing or incomplete here; with several "
                           "nodes, --out must be on a file system that every node shares (then rerun with --resume)")
    return shard
