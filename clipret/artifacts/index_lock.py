"""The writers' lock of an index pair: ``flock`` on ``.gallery.faiss.lock`` beside the index.

Writers (build, ``--add``, ``--remove``) hold it for their whole read-change-write, so a second
writer waits for the first, then gives up after ``CLIPRET_INDEX_LOCK_TIMEOUT`` seconds with a
one-line error. Readers never wait (see :mod:`clipret.artifacts.index`). POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from clipret.artifacts.atomic import write_error
from clipret.errors import ClipretError

__all__ = ["LOCK_TIMEOUT", "LOCK_TIMEOUT_ENV", "index_lock", "index_not_found", "lock_path", "lock_timeout"]

LOCK_TIMEOUT_ENV = "CLIPRET_INDEX_LOCK_TIMEOUT"
LOCK_TIMEOUT = 600.0  # seconds a writer waits for another one
_held: set[tuple[int, Path]] = set()  # (thread, lock file) now held: the holder may take its lock again


def index_not_found(index_path: Path) -> ClipretError:
    """The one-line error for an index that is not there."""
    return ClipretError(f"index not found: {index_path}; build it with `clipret index EMBEDDINGS.npy --out {index_path}`")


def lock_path(index_path: str | os.PathLike[str]) -> Path:
    """The writers' lock file: ``.gallery.faiss.lock`` (left in place; only its ``flock`` matters)."""
    p = Path(index_path)
    return p.with_name(f".{p.name}.lock")


def lock_timeout() -> float:
    """Seconds a writer waits for the lock: ``CLIPRET_INDEX_LOCK_TIMEOUT``, else ``LOCK_TIMEOUT``."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        return float(text) if text else LOCK_TIMEOUT
    except ValueError:
        raise ClipretError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None


@contextlib.contextmanager
def index_lock(index_path: str | os.PathLike[str], *, timeout: float | None = None, create: bool = False) -> Iterator[None]:
    """Hold the exclusive writers' lock of an index pair (``flock`` on :func:`lock_path`).

    Waits up to ``timeout`` seconds (default :func:`lock_timeout`), then raises a one-line
    :class:`ClipretError`. A thread that holds the lock may take it again. Without ``create`` (a
    build) a missing index is a one-line error, and no lock file is left beside it.
    """
    import fcntl

    path = lock_path(index_path).absolute()
    key = (threading.get_ident(), path)
    if key in _held:
        yield
        return
    wait = lock_timeout() if timeout is None else timeout
    if not create and not Path(index_path).is_file():
        raise index_not_found(Path(index_path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ClipretError(f"another process is changing {index_path} (waited {wait:g} s for {path.name}); "
                                       f"let it finish and rerun, or set {LOCK_TIMEOUT_ENV} to wait longer") from None
                time.sleep(0.05)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the flock


