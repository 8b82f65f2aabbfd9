"""Fault injection for crash tests: SIGKILL this process at a chosen file write.

Set ``CLIPRET_FAULT_KILL=WHEN:NAME:N`` where WHEN is ``before-rename`` (the
temporary file is complete, the final name not yet replaced: a kill *during*
the write) or ``after-rename``, NAME is the final file name (fnmatch
pattern) and N the 1-based count of matching writes at which to die.
Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import fnmatch
import os
import signal

_counts: dict[str, int] = {}


def maybe_kill(when: str, filename: str) -> None:
    spec = os.environ.get("CLIPRET_FAULT_KILL")
    if not spec:
        return
    want_when, pattern, nth = spec.split(":")
    if want_when != when or not fnmatch.fnmatch(filename, pattern):
        return
    _counts[spec] = _counts.get(spec, 0) + 1
    if _counts[spec] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


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
