"""Fault injection for crash tests: signal this process at a chosen file write or training step.

Set ``CLIPRET_FAULT_KILL=WHEN:NAME:N[:SIG]`` where WHEN is ``before-rename`` (the
temporary file is complete, the final name not yet replaced: a kill *during*
the write) or ``after-rename``, NAME is the final file name (fnmatch
pattern), N the 1-based count of matching writes at which to die, and SIG the
signal to send (KILL, the default; INT or TERM to test a graceful stop).

Set ``CLIPRET_FAULT_SIGNAL=SIG:STEP[:RANK]`` to send SIG (INT or TERM) while optimiser step STEP
(1-based) is in progress, before its forward pass (the stop must wait for that step); with RANK,
on that torchrun rank only.

Set ``CLIPRET_FAULT_SLOW_EXIT=RANK:SECONDS`` to make torchrun rank RANK wait SECONDS on its way out
after a stop on a signal (so the launcher's closing SIGTERM lands while it exits).

Unset (always, outside tests) they do nothing.
"""

from __future__ import annotations

import fnmatch
import os
import signal

_counts: dict[str, int] = {}


def _send(name: str) -> None:
    os.kill(os.getpid(), signal.Signals[f"SIG{name.upper()}"])


def maybe_kill(when: str, filename: str) -> None:
    spec = os.environ.get("CLIPRET_FAULT_KILL")
    if not spec:
        return
    want_when, pattern, nth, *sig = spec.split(":")
    if want_when != when or not fnmatch.fnmatch(filename, pattern):
        return
    _counts[spec] = _counts.get(spec, 0) + 1
    if _counts[spec] == int(nth):
        _send(sig[0] if sig else "KILL")


def maybe_signal(step: int) -> None:
    """``CLIPRET_FAULT_SIGNAL=SIG:STEP[:RANK]``: send SIG when optimiser step ``step`` (1-based) starts."""
    spec = os.environ.get("CLIPRET_FAULT_SIGNAL")
    if not spec:
        return
    name, at, *rank = spec.split(":")
    if step == int(at) and (not rank or int(rank[0]) == int(os.environ.get("RANK", "0"))):
        _send(name)


def maybe_fail(step: int) -> None:
    """``CLIPRET_FAULT_RAISE=RANK:STEP``: raise a user error on torchrun rank RANK after its
    optimiser step STEP (1-based), as a rank that fails alone would (tests of failing together)."""
    spec = os.environ.get("CLIPRET_FAULT_RAISE")
    if not spec:
        return
    rank, at = (int(x) for x in spec.split(":"))
    if rank == int(os.environ.get("RANK", "0")) and step == at:
        from clipret.errors import ClipretError

        raise ClipretError(f"injected failure at step {step} (CLIPRET_FAULT_RAISE)")


def maybe_slow_exit() -> None:
    """``CLIPRET_FAULT_SLOW_EXIT=RANK:SECONDS``: sleep on rank RANK before leaving after a stop."""
    spec = os.environ.get("CLIPRET_FAULT_SLOW_EXIT")
    if not spec:
        return
    rank, seconds = spec.split(":")
    if int(rank) == int(os.environ.get("RANK", "0")):
        import time

        time.sleep(float(seconds))
