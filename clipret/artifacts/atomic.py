"""Atomic file writes and small read helpers shared by every artifact.

A write goes to a temporary file in the target folder, is flushed and
fsynced, then renamed over the final name; the folder is fsynced too. A file
that already exists keeps its permission bits (a model set to 0600 stays
0600); a new one gets what a plain ``open()`` would give it (0666 minus the
process umask), not ``mkstemp``'s private 0600. A process killed at any
moment leaves the old file or the complete new one, plus at worst a hidden
``.NAME.clipret-PID-XXXXXXXX.tmp`` that :func:`remove_stale_temps` clears
(it leaves every other file alone, a user's ``.notes.tmp`` included).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from clipret import _fault
from clipret.errors import ClipretError, first_line


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by a quick swap."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_DISK_FULL_HINTS = ("no space left", "storagefull", "file write failed", "disk quota")


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df and file managers show)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_error(path: str | os.PathLike[str], exc: BaseException, size_hint: int | None = None) -> ClipretError:
    """One line naming the output file and the cause of a failed write, saying what to do."""
    text = str(exc).lower()
    errno_ = getattr(exc, "errno", None)
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or any(h in text for h in _DISK_FULL_HINTS):
        needs = f" (needs ~{human_bytes(size_hint)})" if size_hint else ""
        return ClipretError(f"no space left on device writing {path}{needs}; free some space and rerun "
                            "(train and embed continue with --resume)")
    if errno_ in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return ClipretError(f"cannot write {path}: a parent of it is a file, not a folder ({exc.filename or path}); "
                            "choose another output path")
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ClipretError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}; choose a writable output path")
    reason = getattr(exc, "strerror", None) or first_line(exc)
    return ClipretError(f"cannot write {path}: {reason}")


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or any(h in str(exc).lower() for h in _DISK_FULL_HINTS)


_TEMP_TAG = "clipret"
_TEMP_NAME = re.compile(rf"^\..+\.{_TEMP_TAG}-(\d+)-[A-Za-z0-9_]+\.tmp$")  # what atomic_path names its temporary files


def kept_mode(path: str | os.PathLike[str]) -> int:
    """The permission bits ``path`` keeps when replaced: its own, or 0666 minus the umask if it is new."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], size_hint: int | None = None, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Use this for writers that want a file name (safetensors, faiss). On error
    the temporary file is removed and ``path`` is left untouched. A failed
    write (a full disk, a parent that is a file, no permission) becomes a
    one-line :class:`ClipretError` naming ``path``; ``size_hint`` (bytes) is
    quoted when the disk is full. The parent folder is created unless
    ``mkdir`` is False: then a missing folder is such an error, and a folder
    another process removed is never silently made again.
    """
    final = Path(path)
    try:
        if mkdir:
            final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{_TEMP_TAG}-{os.getpid()}-", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise write_error(final, exc, size_hint) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            # mkstemp (and some writers' own temp files) give 0600: set the mode the file being
            # replaced has, or else what a plain open() would give, after the writer is done.
            os.fchmod(fh.fileno(), kept_mode(final))
            fh.flush()
            os.fsync(fh.fileno())
        _fault.maybe_kill("before-rename", final.name)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _fault.maybe_kill("after-rename", final.name)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, ClipretError) and _is_write_failure(exc):
            raise write_error(final, exc, size_hint) from exc
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", size_hint: int | None = None, *,
                mkdir: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds
    (``mkdir``: see :func:`atomic_path`)."""
    with atomic_path(path, size_hint, mkdir=mkdir) as tmp:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def ensure_free_space(path: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse up front when the file system holding ``path`` has less than ``needed`` bytes free."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: let the write itself report
    if free < needed:
        raise ClipretError(f"not enough free space for {what} at {path}: needs ~{human_bytes(needed)}, "
                           f"{human_bytes(free)} free; free some space or choose another --out")


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary files killed clipret writers left in ``folder``; return how many.

    Only :func:`atomic_path`'s own names (``.NAME.clipret-PID-XXXXXXXX.tmp``) are touched, and not
    those of another process that is still running (it may be writing them now).
    """
    n = 0
    for p in Path(folder).glob(f".*.{_TEMP_TAG}-*.tmp"):
        m = _TEMP_NAME.match(p.name)
        if m is None or _is_other_live_process(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def _is_other_live_process(pid: int) -> bool:
    """Whether ``pid`` is a running process other than this one (a killed writer's pid may be ours
    again, e.g. pid 1 in a new container: its temp files are stale all the same)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def write_json(path: str | os.PathLike[str], obj: Any, *, mkdir: bool = True) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (``mkdir``: see :func:`atomic_path`)."""
    with atomic_open(path, "w", mkdir=mkdir) as fh:
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
