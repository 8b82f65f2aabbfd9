"""One optimiser step, and what happens when it is not finite.

A step whose loss, gradient or BatchNorm statistics are not finite (NaN or inf; the ranks
agree) leaves the model as it was: weights (the optimiser step is skipped) and statistics
(snapshotted before the forward, put back). ``MAX_NONFINITE_STEPS`` such steps in a row stop
the run as diverged, with one line that says what to change.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from clipret import runtime
from clipret.errors import ClipretError
from clipret.parallel import groups
from clipret.training.llrd import current_lrs
from clipret.training.setup import TrainState
from clipret.training.state import all_finite, restore_buffers, snapshot_buffers

__all__ = ["MAX_NONFINITE_STEPS", "train_step"]

MAX_NONFINITE_STEPS = 20  # skipped non-finite steps in a row before training stops as diverged


def train_step(state: TrainState, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
    """One optimiser step on a collated batch; returns {"loss", "lr", "head_lr", ...miner info}.

    ``loss`` is the loss of the whole step's batch (every rank's); ``lr`` is the base LR
    this step used (the top block's), ``head_lr`` the head's.
    """
    fmt = torch.channels_last if state.channels_last else torch.preserve_format
    images = batch["images"].to(state.device, non_blocking=True, memory_format=fmt)
    labels = torch.as_tensor(state.data.train_labels[batch["indices"].numpy()], device=state.device)
    buffers = snapshot_buffers(state.model)  # the train-mode forward updates the BatchNorm statistics
    with runtime.autocast(state.device, state.amp):
        emb = state.forward(images)
    loss, info = state.objective(emb, labels, epoch)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.objective.sync_grads()
    state.scaler.unscale_(state.optimizer)
    norm = torch.nn.utils.clip_grad_norm_([*state.model.parameters(), *state.objective.parameters()], state.cfg.grad_clip)
    grads_finite = bool(torch.isfinite(norm))  # of gradients already averaged over the ranks: every rank decides alike
    # the statistics (and ArcFace's loss) are each rank's own, from its own batch: the ranks agree on them explicitly
    finite = grads_finite and groups.all_true(all_finite([loss.detach(), *state.model.buffers()]), state.device)
    if finite or (state.scaler.is_enabled() and not grads_finite):
        state.scaler.step(state.optimizer)  # an fp16 scaler skips a non-finite step itself (and lowers its scale)
    state.scaler.update()
    if not finite:
        restore_buffers(state.model, buffers)
    state.nonfinite_steps = 0 if finite else state.nonfinite_steps + 1
    if state.nonfinite_steps >= MAX_NONFINITE_STEPS:
        raise ClipretError(
            f"training diverged: the loss, its gradient or the BatchNorm statistics were not finite for "
            f"{state.nonfinite_steps} steps in a row (up to step {state.step + 1}); those steps left the model as it was, "
            f"and {state.out} keeps the last checkpoint and best model; train again with a lower --lr or a longer --warmup")
    lr, head_lr = state.last_lrs = current_lrs(state.optimizer)
    if finite:
        state.scheduler.step()
    else:  # the schedule moves on over a skipped step; PyTorch would take that for a call out of order
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            state.scheduler.step()
    state.step += 1
    return {"loss": float(loss.detach()) / state.objective.scale, "lr": lr, "head_lr": head_lr, "finite": finite, **info}
