"""Linear warmup, then cosine decay to zero, as a multiplier of each group's base LR."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup: float) -> int:
    """``warmup`` is a fraction of all steps (0.15) or, if >= 1, a step count."""
    steps = int(warmup) if warmup >= 1 else int(round(warmup * total_steps))
    return max(0, min(steps, total_steps))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based, before the step is taken).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the
    first step already moves. Then ``0.5 * (1 + cos(pi * t))`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, reaching 0
    after the last step.
    """
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(optimizer, total_steps: int, warmup_steps: int):  # type: ignore[no-untyped-def]
    """A LambdaLR applying :func:`warmup_cosine` to every param group's own LR."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))


def move_to_step(scheduler, step: int) -> None:  # type: ignore[no-untyped-def]
    """Put a :func:`make_scheduler` schedule at ``step`` optimiser steps taken: the next step
    uses each group's base LR times the multiplier for ``step`` (resuming with another world
    size, where the step count of the run changed)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
