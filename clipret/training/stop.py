"""Stopping ``clipret train`` on SIGINT (Ctrl-C) or SIGTERM without losing work.

The loop catches both signals (:func:`clipret.runtime.catch_stop_signals`, deferred). The step
in progress finishes; after it every rank agrees to stop (under torchrun a signal on any rank
stops them all after the same step), a checkpoint is written there, atomically as --save-every's
are, and :class:`TrainingStopped` is raised. Resuming from that checkpoint ends with the same
weights as an uninterrupted run, as resuming after ``kill -9`` at a checkpoint does.
"""

from __future__ import annotations

from pathlib import Path

from clipret import runtime
from clipret.parallel import groups
from clipret.training.setup import TrainState

__all__ = ["TrainingStopped", "asked", "stopped"]


class TrainingStopped(runtime.Interrupted):
    """Training stopped on a signal after step ``step`` of ``total``; ``run`` holds its checkpoint."""

    def __init__(self, signum: int, run: Path, step: int, total: int) -> None:
        super().__init__(signum)
        self.run, self.step, self.total = run, step, total

    def resume_command(self) -> str:
        return runtime.command_line(["train", "--resume", str(self.run)])


def asked(state: TrainState) -> bool:
    """Whether a stop signal reached this rank or, under torchrun, any rank. A collective there:
    every rank calls it after the same step."""
    return not groups.all_true(state.stop.signum is None, state.device)


def stopped(state: TrainState) -> TrainingStopped:
    """The exception to raise once :func:`asked` said yes (every rank calls it): it carries the
    signal rank 0 got, or else the first rank's that got one."""
    signum = next(s for s in groups.all_gather_object(state.stop.signum) if s is not None)
    return TrainingStopped(signum, state.out, state.step, state.total_steps)
