"""Device, precision, seeding, distributed-rank and stop-signal helpers shared by every command.

Rank helpers read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), so
code can ask "am I rank 0?" before, or without, initialising a process group.
Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from clipret.errors import ClipretError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cpus_per_rank() -> int:
    """This process's fair share of the CPUs it may use: :func:`available_cpus` split between the
    ranks of this node (at least 1)."""
    return max(1, available_cpus() // local_world_size())


MAX_AUTO_WORKERS = 8
SMALL_JOB_IMAGES = 256  # below this, starting worker processes costs more than it saves


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, n_images: int | None = None) -> int:
    """Data-loading worker processes: ``workers`` if given, else an automatic choice.

    Automatic: the CPUs this process may use, capped at ``MAX_AUTO_WORKERS``;
    0 (decode in the main process) for jobs under ``SMALL_JOB_IMAGES`` images.
    """
    if workers is not None:
        if workers < 0:
            raise ClipretError(f"--workers must be non-negative, got {workers}")
        return workers
    if n_images is not None and n_images < SMALL_JOB_IMAGES:
        return 0
    return min(available_cpus(), MAX_AUTO_WORKERS)


def resolve_device(device: str = "auto") -> Any:
    """"auto" -> cuda if available, else cpu. Asking for cuda without one is a user error.

    "auto" and a bare "cuda" mean this process's own GPU: ``cuda:LOCAL_RANK`` under torchrun
    (modulo the visible GPUs, so a launcher that shows each rank one GPU also works), ``cuda:0``
    otherwise. An explicit ``cuda:N`` is taken as given.
    """
    import torch

    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise ClipretError(f"unknown --device {device!r}; use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ClipretError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device in {"auto", "cuda"}:
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    chosen, count = torch.device(device), torch.cuda.device_count()
    if chosen.index is not None and chosen.index >= count:
        raise ClipretError(f"--device {device} was asked for but torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return chosen


def set_tf32(device: Any, enabled: bool = True) -> None:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (or not).

    TF32 keeps float32's range with a 10-bit mantissa in the products (sums stay float32); torch
    leaves it off for matmuls by default. Process-wide; a no-op for other devices.
    """
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolve_amp(amp: str | None, device: Any) -> Any:
    """Autocast dtype for ``--amp bf16|fp16|none``; default bf16 on CUDA, none on CPU."""
    import torch

    if amp is None or amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in table:
        raise ClipretError(f"unknown --amp {amp!r}; use bf16, fp16 or none")
    if table[amp] is torch.float16 and device.type != "cuda":
        raise ClipretError("--amp fp16 needs a CUDA device; use --amp none (or bf16) on CPU")
    return table[amp]


def autocast(device: Any, dtype: Any) -> Any:
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- SIGINT and SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped a command; it exits with :attr:`exit_code` (130 or 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class StopRequest:
    """The first stop signal :func:`catch_stop_signals` caught, if any (its number, else None)."""

    signum: int | None = None


@contextlib.contextmanager
def catch_stop_signals(defer: bool) -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM inside the block; the previous handlers come back on the way out.

    ``defer=False``: raise :class:`Interrupted` at once (what is finished stays finished).
    ``defer=True``: only note the first signal in the yielded :class:`StopRequest`; the caller
    stops at its next safe point. On one process a second Ctrl-C raises :class:`Interrupted` at
    once. Under torchrun repeats are ignored: the launcher passes on the Ctrl-C every rank already
    got (and kills the ranks 30 s later). Off the main thread, where Python cannot set handlers,
    nothing is caught.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        again = request.signum is not None and signum == signal.SIGINT and world_size() == 1
        if not defer or again:
            raise Interrupted(signum)
        if request.signum is None:
            request.signum = signum

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    stopping = False
    try:
        yield request
    except Interrupted:
        # Every rank stops together under torchrun, also those the signal never reached. Once one rank
        # exits, the launcher sends the others SIGTERM: that must not kill them mid-exit (their own exit
        # code, 130/143, says why they stopped).
        stopping = world_size() > 1
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if stopping else (h if h is not None else signal.SIG_DFL))


def command_line(args: Sequence[str]) -> str:
    """``clipret ARGS`` quoted for a POSIX shell; under torchrun, launched the same way (on several
    nodes, torchrun's own options are left for the user to add)."""
    line = shlex.join(["clipret", *map(str, args)])
    if world_size() <= 1:
        return line
    if world_size() == local_world_size():
        return f"torchrun --nproc_per_node {local_world_size()} -m {line}"
    return f"torchrun <the same options> -m {line}"
