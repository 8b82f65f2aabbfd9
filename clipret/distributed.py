"""torch.distributed under torchrun: one process group for every command that runs on several ranks.

clipret never launches processes itself: ``torchrun --nproc_per_node N -m clipret train ...`` (or
``embed``, ``query``) starts N copies, and each reads RANK, WORLD_SIZE and LOCAL_RANK from the
environment (:mod:`clipret.runtime`). :func:`process_group` initialises the group when
WORLD_SIZE > 1 (NCCL for CUDA devices, gloo for the CPU) and tears it down on the way out;
with one process it does nothing, so the same code runs unchanged on one CPU, one GPU, 8 GPUs or
several nodes.

Collectives here are thin wrappers that are no-ops with one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

from clipret import runtime

__all__ = ["process_group", "active", "barrier", "all_gather_object", "broadcast_object", "backend_for"]

DEFAULT_TIMEOUT_S = 600  # a collective waits this long for a missing rank before failing


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

    ``device`` picks the backend. The group is destroyed on exit, also on error. The timeout
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
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    try:
        yield True
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


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
