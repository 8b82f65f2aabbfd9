"""torch.distributed under torchrun: one process group for every command that runs on several ranks.

clipret never launches processes itself: ``torchrun --nproc_per_node N -m clipret train ...`` (or
``embed``, ``query``) starts N copies, and each reads RANK, WORLD_SIZE and LOCAL_RANK from the
environment (:mod:`clipret.runtime`). :func:`process_group` initialises the group when
WORLD_SIZE > 1 (NCCL for CUDA devices, gloo for the CPU) and tears it down on the way out;
with one process it does nothing, so the same code runs unchanged on one CPU, one GPU, 8 GPUs or
several nodes.

Collectives here are thin wrappers that are no-ops with one process.

Two kinds of waiting: a collective on the default group waits at most its timeout
(``CLIPRET_DIST_TIMEOUT``, 600 s), which is how long a rank that hangs can hold the others.
Where ranks wait for real work of another rank (rank 0 checking every training image while
the others wait), :func:`work_group` gives a gloo group with a long timeout
(``CLIPRET_WAIT_TIMEOUT``, 24 h) and :func:`from_main` runs the work on rank 0 over it. A rank
that dies does not leave the others waiting that long: gloo reports the closed connection
at once, and torchrun stops every rank as soon as one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from clipret import runtime
from clipret.errors import ClipretError, first_line

__all__ = ["PeerError", "process_group", "active", "barrier", "all_true", "all_gather_object", "broadcast_object",
           "backend_for", "exit_rank", "fail_together", "from_main", "gather", "lost_peer", "rank_and_world", "work_group"]

DEFAULT_TIMEOUT_S = 600  # a collective waits this long for a missing rank before failing
WAIT_TIMEOUT_S = 24 * 3600  # work_group: a rank may wait this long for another's work
T = TypeVar("T")


class PeerError(ClipretError):
    """This rank stops because another one failed, and that one printed why: rank 0's error
    from :func:`from_main` or :func:`fail_together`, or a rank that left a collective of a
    :func:`work_group` (it raised, or was killed). The CLI exits non-zero without printing it again."""


@contextlib.contextmanager
def _peers_lost(what: str) -> Iterator[None]:
    """A collective that fails because a rank exited (gloo reports a closed connection) becomes :class:`PeerError`."""
    try:
        yield
    except RuntimeError as exc:
        raise PeerError(f"another rank stopped while this one {what} ({first_line(exc)})") from exc


def backend_for(device: Any) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if getattr(device, "type", str(device)).startswith("cuda") else "gloo"


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def process_group(device: Any, timeout_s: float | None = None) -> Iterator[bool]:
    """Initialise the default process group when WORLD_SIZE > 1; yield whether one is active.

    ``device`` picks the backend. The group is destroyed on exit, also on error; on a normal
    exit after a barrier, since a rank that tears its group down while another still talks
    to it can abort (gloo). The timeout
    (``CLIPRET_DIST_TIMEOUT`` seconds, default 600) bounds how long a collective waits for a rank
    that died; torchrun also stops the other ranks as soon as one exits with an error.
    """
    if runtime.world_size() <= 1:
        yield False
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # already set up by the caller (tests, notebooks)
        yield True
        return
    seconds = float(timeout_s or os.environ.get("CLIPRET_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = backend_for(device)
    if backend == "nccl":  # this rank's GPU: the device's own index, else LOCAL_RANK (as runtime.resolve_device)
        index = getattr(device, "index", None)
        torch.cuda.set_device(index if index is not None else runtime.local_rank() % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    try:
        yield True
        dist.barrier()  # a normal exit: every rank done with every collective before any tears down
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def all_true(flag: bool, device: Any = "cpu") -> bool:
    """True when ``flag`` is true on every rank (``flag`` itself with one process). ``device``:
    where the one-element tensor goes (a CUDA device under NCCL)."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process). Objects must be picklable
    values made by clipret itself (arrays, lists, dicts): they travel between our own ranks only."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def work_group() -> Iterator[Any]:
    """A gloo group over every rank with a long timeout (``CLIPRET_WAIT_TIMEOUT`` seconds,
    default 24 h), for waiting on another rank's work; ``None`` without an active group.
    Every rank must enter it at the same point."""
    if not active():
        yield None
        return
    import torch.distributed as dist

    seconds = float(os.environ.get("CLIPRET_WAIT_TIMEOUT") or WAIT_TIMEOUT_S)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
    try:
        yield group
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def from_main(fn: Callable[[], T], group: Any = None) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank (over ``group``, e.g. a
    :func:`work_group`; ``None`` with one process runs ``fn`` here).

    A :class:`ClipretError` from ``fn`` is raised on rank 0 as is and as :class:`PeerError`,
    with the same message, on the others, so every rank stops together.
    """
    if group is None:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: ClipretError | None = None
    if dist.get_rank(group) == 0:
        try:
            box[0] = ("ok", fn())
        except ClipretError as exc:
            error, box[0] = exc, ("error", str(exc))
    with _peers_lost("waited for rank 0"):
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise PeerError(value)
    return value


def rank_and_world(group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group`` (a :func:`work_group`); ``(0, 1)`` for ``None``."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def gather(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order, over ``group`` (``[obj]`` for ``None``).
    Objects are values clipret made itself (arrays, lists, dicts): they travel between our own ranks only."""
    if group is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size(group)
    with _peers_lost("gathered results"):
        dist.all_gather_object(out, obj, group=group)
    return out


def fail_together(message: str, group: Any) -> None:
    """Raise ``message`` on every rank: :class:`ClipretError` on rank 0 (which prints it),
    :class:`PeerError` elsewhere. For a condition every rank checked on the same gathered data."""
    if rank_and_world(group)[0] == 0:
        raise ClipretError(message)
    raise PeerError(message)


def lost_peer(exc: BaseException) -> bool:
    """True when a collective failed because another rank went away (gloo or NCCL messages, or
    torch's ``DistError``)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or "closed by peer" in text or "Connection reset" in text


def exit_rank(code: int) -> NoReturn:
    """Leave this rank at once, after its group lost a peer or stopped on a signal mid-epoch: flush
    stdout and stderr, then ``os._exit(code)``. A normal interpreter exit runs gloo's C++ destructors,
    which can abort ("terminate called without an active exception", signal 6) on a connection the
    peer broke, or (about one run in eight, measured on 2 CPU ranks) after a group torn down without
    a final barrier. Only for those paths: every file this rank writes is already closed or renamed
    by then."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
