"""What a resumable checkpoint holds, and how state goes in and out of it: the RNG states, the
GradScaler's, and the model buffers a skipped step puts back.

Everything is stored as tensors, numbers, strings, lists and dicts, so the
file loads with ``torch.load(weights_only=True)``: no pickled objects.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clipret import artifacts, runtime
from clipret.parallel import groups

if TYPE_CHECKING:
    from clipret.training.setup import TrainState

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"  # one JSON line per epoch, written by the loop


def save_checkpoint(state: TrainState, epoch: int, batch: int, losses: list[float]) -> None:
    """Write ``checkpoint.pt``: resume goes on at batch ``batch`` (of each rank) of epoch ``epoch`` (0-based).

    Every rank calls this (each hands over its RNG state); rank 0 writes.
    """
    rngs = groups.all_gather_object(capture_rng(state.device))
    if not runtime.is_main():
        return
    artifacts.save_checkpoint(state.out / CHECKPOINT_NAME, {
        "model": state.model.state_dict(), "objective": state.objective.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
        "epoch": epoch, "batch": batch, "step": state.step, "rng": rngs[0], "rng_ranks": rngs,
        "world_size": state.world_size,
        "best": state.best, "history": state.history, "config": state.cfg.to_dict(), "spec": state.spec.to_dict(),
        "classes": state.data.classes, "train_ids": state.data.ids_digest(), "epoch_losses": losses,
        "last_lrs": list(state.last_lrs or ()),  # for the epoch's row, when a stop came after its last step
    })


def _cuda_index(device: torch.device | None) -> int | None:
    """The CUDA device whose RNG this process draws from: ``device``'s (its index, else the current
    device), or the current device when ``device`` is None; None when it is not a CUDA device."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    return device.index if device is not None and device.index is not None else torch.cuda.current_device()


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch (CPU) and, on CUDA, its own device's only
    (``device``; the current one when None), so that a resume that sees fewer GPUs can restore it."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`capture_rng` captured; the CUDA state goes to ``device`` (the current one
    when None). Older checkpoints hold a list, every visible GPU's state in device order: this
    device's entry is taken, and none when the saved run saw fewer GPUs than its index."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    saved, index = state.get("cuda"), _cuda_index(device)
    if saved is None or index is None:
        return
    if isinstance(saved, (list, tuple)):
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, index)


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """Load a checkpoint's GradScaler state. A run without fp16 saved ``{}`` (its scaler was off):
    a resume that switches ``--amp fp16`` on starts its scaler fresh."""
    if saved:
        scaler.load_state_dict(saved)


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s buffers (BatchNorm running statistics and step counts): small, taken
    before a training forward so that a skipped step can put them back (:func:`restore_buffers`)."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, snapshot: list[torch.Tensor]) -> None:
    """Put back the buffer values of :func:`snapshot_buffers`, in place (the tensors stay the same)."""
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), snapshot, strict=True):
            buffer.copy_(saved)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor of ``tensors`` (on one device) is finite: no NaN or inf."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())
