"""Which settings a resumed run keeps, and which it may change.

A run folder holds everything needed to continue it: its checkpoint carries
the full :class:`TrainConfig`, the data root included. Resuming keeps those
settings; a setting given again explicitly (on the command line or in a
``--config`` file) replaces the saved one only if it is about where things
are or how they run (:data:`clipret.config.RESUME_OVERRIDABLE`), since the
rest would change what the remaining steps compute.

The number of processes (torchrun's world size) may change too: see :func:`continue_at`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from clipret.config import RESUME_OVERRIDABLE, TrainConfig
from clipret.errors import ClipretError


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "root" and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def resumed_config(
    saved: Mapping[str, Any], run: str | Path, overrides: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The saved settings of the run in ``run``, with explicit ``overrides`` applied.

    ``overrides`` maps TrainConfig field names to the values the user gave.
    Returns (config, {name: (saved value, new value)} for every setting that
    changed). ``out`` always becomes ``run``, wherever the folder was first
    written. Raises :class:`ClipretError` naming any setting that may not
    change, and its saved value.
    """
    cfg = TrainConfig.from_dict(dict(saved))
    known = {f.name for f in fields(TrainConfig)}
    changed: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for name, value in (overrides or {}).items():
        if name not in known:
            raise ValueError(f"not a TrainConfig setting: {name}")
        if name == "out" or _same(name, getattr(cfg, name), value):
            continue
        if name in RESUME_OVERRIDABLE:
            changed[name] = (getattr(cfg, name), value)
        else:
            refused.append(name)
    if refused:
        was = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in refused)
        raise ClipretError(f"{'these settings' if len(refused) > 1 else 'this setting'} cannot change when resuming "
                           f"(the run has {was}); drop {'them' if len(refused) > 1 else 'it'}, or start a new run with another --out")
    cfg = replace(cfg, **{n: new for n, (_, new) in changed.items()}, out=str(run))
    return cfg, changed



def continue_at(epoch: int, batch: int, saved_world: int, world: int, epoch_length: int) -> tuple[int, int]:
    """Where a run saved by ``saved_world`` ranks goes on with ``world`` ranks.

    The checkpoint says each of its ranks had taken ``batch`` batches of epoch ``epoch``
    (0-based), so ``batch * saved_world`` batches of the shared epoch plan were trained on.
    Each of the ``world`` ranks now starts at its batch ``ceil(batch * saved_world / world)``
    (up to ``world - 1`` batches of the plan are skipped), and the step count becomes
    ``epoch * epoch_length + that``, where ``epoch_length`` is the batches per rank per epoch
    with ``world`` ranks. Returns ``(start_batch, step)``.
    """
    start = min(-(-batch * saved_world // world), epoch_length)
    return start, epoch * epoch_length + start
