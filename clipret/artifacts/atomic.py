"""Atomic file writes and small read helpers shared by every artifact.

A write goes to a temporary file in the target folder, is flushed and
fsynced, then renamed over the final name; the folder is fsynced too. A
process killed at any moment leaves the old file or the complete new one,
plus at worst a hidden ``.NAME.*.tmp`` that :func:`remove_stale_temps` clears.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from clipret import _fault
from clipret.errors import ClipretError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Use this for writers that want a file name (safetensors, faiss). On error
    the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        _fault.maybe_kill("before-rename", final.name)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _fault.maybe_kill("after-rename", final.name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files a killed writer left in ``folder``; return how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipretError(f"{what} not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipretError(f"{what} {p} is not valid JSON ({exc}); regenerate it") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
