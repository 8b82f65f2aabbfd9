"""Start a new run from a trained clipret run: ``clipret train --pretrained RUN``.

``--pretrained`` takes a run folder written by ``clipret train``, or its
``model.safetensors``. The tower starts from the run's tower (it must be the
same backbone); the pooling and the head start from the run's too where their
shapes fit the new settings (same pool, embedding size and head BatchNorm
switch), and fresh otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from clipret import artifacts
from clipret.errors import ClipretError

__all__ = ["load_run_weights", "run_source"]


def run_source(pretrained: str | os.PathLike[str] | None) -> Path | None:
    """The run folder ``pretrained`` names (the folder, or its weights file), or None if it names none.

    A folder that is not a clipret run is an error (one line): a folder never names open_clip weights.
    """
    if pretrained is None:
        return None
    path = Path(pretrained)
    if path.is_dir():
        artifacts.read_model_config(path)  # raises a one-line error for any other folder
        return path
    if path.is_file() and path.name == artifacts.WEIGHTS_NAME and (path.parent / artifacts.CONFIG_NAME).is_file():
        config = artifacts.read_json(path.parent / artifacts.CONFIG_NAME, "model config")
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return path.parent
    return None


def run_model_spec(run: Path) -> dict[str, Any]:
    """The saved :class:`clipret.model.build.ModelSpec` of ``run``, as a dict."""
    spec = artifacts.read_model_config(run)["model"]
    if spec.get("pool") == "clip":
        raise ClipretError(f"{run} holds CLIP's own embedding, not a trained clipret model")
    return spec


def load_run_weights(encoder: nn.Module, run: Path) -> list[str]:
    """Load ``run``'s weights into ``encoder`` (a fresh :class:`RetrievalNet`): the whole tower,
    and each of the pooling and head where every tensor's shape fits. Returns notes on what
    started fresh (empty when everything came from the run)."""
    state = artifacts.load_model_folder(run)[1]
    own = encoder.state_dict()
    tower = {k: v for k, v in state.items() if k.startswith("tower.")}
    missing = [k for k in own if k.startswith("tower.") and k not in tower]
    misfit = [k for k, v in tower.items() if k not in own or own[k].shape != v.shape]
    if missing or misfit:
        shown = ", ".join((missing or misfit)[:3])
        raise ClipretError(f"the tower of {run} does not fit this model ({shown}); pass the --model it was trained with")
    load = dict(tower)
    notes = []
    for part in ("pool", "head"):
        theirs = {k: v for k, v in state.items() if k.startswith(part + ".")}
        mine = {k: v for k, v in own.items() if k.startswith(part + ".")}
        if set(theirs) == set(mine) and all(theirs[k].shape == mine[k].shape for k in mine):
            load.update(theirs)
        else:
            notes.append(f"the {part} starts fresh: its shape differs from {run}'s")
    encoder.load_state_dict(load, strict=False)
    return notes
