"""``OUT.parts/``: the progress folder of ``clipret embed --out OUT``.

It holds ``run.json`` (model fingerprint, id count and digest, and every setting that changes
a row or how rows are grouped: :data:`ROW_SETTINGS`) and one ``shard-NNNNNN.npy`` + ``.json``
pair per finished shard (the embeddings format of :mod:`clipret.artifacts.embeddings`: rows of
kept ids, and the skipped ones). ``--resume`` reuses the shards only when all of that matches,
so a merged file never mixes rows made two ways; a run without ``--resume`` refuses to throw
finished shards away unless ``--overwrite`` says so. Under torchrun every rank writes its own
shards here and rank 0 merges them, so with several nodes ``OUT`` must lie on a file system
every node shares.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipret import artifacts
from clipret.artifacts import Embeddings
from clipret.errors import ClipretError

__all__ = ["ROW_SETTINGS", "discard_parts", "finished_shards", "load_shard", "parts_dir", "prepare_parts",
           "reusable_shard", "shard_path"]

# Settings that change the rows (or which ids share a shard), as run.json records them. The batch
# size counts: a row's last bits depend on the batch it is computed in. The world size and
# --workers do not: every shard is embedded in the same batches whoever embeds it.
ROW_SETTINGS = ("shard_size", "batch_size", "tta", "exact_decode", "amp", "device", "decode")
# What a run.json written before a setting existed used: every earlier run decoded with PIL.
_BEFORE_RECORDED = {"decode": "pil"}
_UNRECORDED = object()


def parts_dir(out: Path) -> Path:
    """``x.npy`` -> ``x.npy.parts``."""
    return out.with_name(out.name + ".parts")


def shard_path(parts: Path, n: int) -> Path:
    return parts / f"shard-{n:06d}.npy"


def discard_parts(parts: Path) -> None:
    """Remove ``parts`` as one step, then its contents: it is first renamed to a hidden sibling.

    Other ranks may be writing shards into ``parts`` at that moment. After the rename their
    writes fail on the missing folder (and :func:`clipret.embedding.sharded.write_shard` tells them a
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


def finished_shards(parts: Path) -> int:
    """How many finished shards ``parts`` holds (a shard is finished once its manifest is written)."""
    return len(list(parts.glob("shard-*.json"))) if parts.is_dir() else 0


def prepare_parts(out: Path, ids: Sequence[str], fingerprint: str, settings: Mapping[str, Any],
                  automatic: Mapping[str, Any], *, resume: bool, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Create (or, with ``resume``, check and keep) ``OUT.parts``; return it and the settings used.

    ``settings`` holds every one of :data:`ROW_SETTINGS`. For a name in ``automatic`` (the shard
    and batch sizes) None means automatic: on ``resume`` the interrupted run's value (so it is
    reused whatever changed in between: the world size, the clipret version's automatic choice),
    else ``automatic[name]``. Without ``resume``, finished shards are discarded only with
    ``overwrite``, else refused; with it, parts of another model, other images or other settings
    are refused, naming what differs (:class:`ClipretError`, one line).
    """
    parts = parts_dir(out)
    previous = _previous_run(parts) if resume else _clear(parts, overwrite)
    chosen = {name: value if value is not None or name not in automatic else _recorded(previous, name) or automatic[name]
              for name, value in settings.items()}
    info = {"fingerprint": fingerprint, "n_ids": len(ids), "ids_sha256": artifacts.ids_digest(ids), **chosen}
    if parts.is_dir() and previous != info and (previous is not None or finished_shards(parts)):
        raise ClipretError(f"{parts} holds partial results {'; '.join(_differences(previous, info))}; resume with the "
                           "same model, images and settings, or pass --overwrite (without --resume) to start again")
    parts.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(parts / "run.json", info)
    return parts, chosen


def _previous_run(parts: Path) -> dict[str, Any] | None:
    """The interrupted run's ``run.json``, if there is one."""
    if not (parts / "run.json").is_file():
        return None
    previous = artifacts.read_json(parts / "run.json", "partial-run manifest")
    return {**_BEFORE_RECORDED, **previous} if isinstance(previous, dict) else {}


def _clear(parts: Path, overwrite: bool) -> None:
    """Remove ``parts`` for a new run: never finished shards, unless ``overwrite``."""
    if finished_shards(parts) and not overwrite:
        raise ClipretError(f"{parts} holds {finished_shards(parts)} finished shard(s) of an interrupted run; pass "
                           "--resume to continue it, or --overwrite to discard them and start again")
    discard_parts(parts)


def _recorded(previous: Mapping[str, Any] | None, name: str) -> int | None:
    """A size the interrupted run recorded (a positive int), else None."""
    value = (previous or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _differences(previous: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """What differs between an interrupted run's run.json and this run, in words."""
    if previous is None:
        return ["of an unknown run (its run.json is missing)"]
    said = []
    if previous.get("fingerprint") != now["fingerprint"]:
        said.append("of another model")
    if (previous.get("n_ids"), previous.get("ids_sha256")) != (now["n_ids"], now["ids_sha256"]):
        said.append("of other images (the folder changed)")
    for name in ROW_SETTINGS:
        if previous.get(name, _UNRECORDED) != now[name]:
            said.append(f"made with {_option(name, previous.get(name, _UNRECORDED))} (now {_option(name, now[name])})")
    return said


def _option(name: str, value: Any) -> str:
    """A setting as the command line spells it: ``--exact-decode``, ``no --tta``, ``--batch-size 64``."""
    flag = "--" + name.replace("_", "-")
    if value is _UNRECORDED:
        return f"an unrecorded {flag}"
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"


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
