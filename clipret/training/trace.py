"""A per-step trace of training, for tests and bench/ddp.py; off unless asked for.

With ``CLIPRET_TRAIN_TRACE=DIR`` in the environment, every rank appends one JSON line per
optimiser step to ``DIR/rank-R.jsonl``:

    {"step": 1, "rank": 0, "world_size": 2, "loss": ..., "t_start": ..., "t_end": ..., "params": "<sha256>"}

``params`` is a SHA-256 of every parameter's bytes, in ``named_parameters`` order, after the
step: equal digests on all ranks mean bit-identical weights. ``t_start``/``t_end`` are
``time.perf_counter()`` around the step (the digest is taken after ``t_end``). Hashing copies
every weight to the CPU, so a traced run is slower: it is for checking, not for timing a
large model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from clipret import runtime

ENV = "CLIPRET_TRAIN_TRACE"


def params_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters' bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class StepTrace:
    """Appends one line per step for this rank; :meth:`from_env` gives None when tracing is off."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / f"rank-{runtime.rank()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        folder = os.environ.get(ENV)
        return cls(folder) if folder else None

    def record(self, step: int, model: nn.Module, loss: float, t_start: float, t_end: float) -> None:
        row: dict[str, Any] = {"step": step, "rank": runtime.rank(), "world_size": runtime.world_size(),
                               "loss": loss, "t_start": t_start, "t_end": t_end, "params": params_digest(model)}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
