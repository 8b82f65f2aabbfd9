"""The training loop behind ``clipret train``.

:func:`train` starts a run and :func:`resume` continues one; both report
through an ``on_event(kind, payload)`` callback so the CLI can draw progress
without the loop knowing about terminals. Kinds: "check" and "checked" (the
up-front image validation), "setup", "step", "epoch", "done".

The pieces are separate so that one can change without the others:
:func:`clipret.training.setup.prepare` builds the run, :func:`run_epoch` feeds
batches to :func:`clipret.training.step.train_step`, and :func:`end_epoch` validates, exports the
best model and checkpoints. On SIGINT or SIGTERM the step in progress finishes, a checkpoint is
written after it and :class:`clipret.training.stop.TrainingStopped` is raised.

The loop is resumable and rank-aware: every random choice is seeded per
epoch (sampler), per sample (augmentation, see
:class:`clipret.data.dataset.ImageFolderDataset`) or captured in the
checkpoint (python/numpy/torch RNG of every rank, which dropout draws from);
the sampler can start mid-epoch; and only rank 0 writes files.

A step whose loss, gradient or BatchNorm statistics are not finite (NaN or inf; the ranks agree)
leaves the model as it was, weights and statistics (snapshotted before the forward, put back), and
is left out of the epoch's mean loss; a warning says so once per streak, and
``MAX_NONFINITE_STEPS`` in a row stop the run as diverged (:mod:`clipret.training.step`). An epoch whose held-out embeddings
are not finite is scored as a failure (``val_nonfinite``), never as a result, and never exported.

Under torchrun (``torchrun --nproc_per_node N -m clipret train ...``) every
rank runs this same loop in DistributedDataParallel (:mod:`clipret.training.ddp`):
the process group is set up here, around the whole run, and taken down on the
way out, also on error. Only rank 0 reports events and writes files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipret import _fault, artifacts, runtime
from clipret.config import NO_WEIGHTS, TrainConfig
from clipret.data.dataset import collate
from clipret.errors import ClipretError
from clipret.model.build import save_model
from clipret.parallel import groups
from clipret.training import stop
from clipret.training.heldout import nonfinite_warning, validate_epoch, validate_start
from clipret.training.llrd import current_lrs
from clipret.training.resume import resumed_config
from clipret.training.setup import EXCLUDED_NAME, Event, TrainState, prepare, replace_run
from clipret.training.state import CHECKPOINT_NAME, METRICS_NAME, save_checkpoint
from clipret.training.step import train_step

__all__ = ["CHECKPOINT_NAME", "EXCLUDED_NAME", "METRICS_NAME", "resume", "train"]


def _noop(kind: str, payload: dict[str, Any]) -> None:
    pass


def train(cfg: TrainConfig, *, overwrite: bool = False, on_event: Event = _noop) -> dict[str, Any]:
    """Fine-tune a retrieval model on ``cfg.root``; write the run into ``cfg.out``.

    Returns a summary dict (best epoch, its metrics, paths). Under torchrun, every rank
    calls this; only rank 0 gets events (``on_event``) and writes files.
    """
    cfg.validate()
    on_event = on_event if runtime.is_main() else _noop
    out = Path(cfg.out)
    if not overwrite and ((out / CHECKPOINT_NAME).exists() or (out / artifacts.WEIGHTS_NAME).exists()):
        raise ClipretError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to replace it, or another --out")
    if cfg.root:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "root": str(Path(cfg.root).resolve())})
    with groups.process_group(runtime.resolve_device(cfg.device)):
        if overwrite:  # the old run goes before any rank writes (rank 0 moves it aside; a refusal stops every rank)
            with groups.work_group() as group:
                groups.from_main(lambda: replace_run(cfg), group)
        _remove_stale_temps(out)
        return _run(prepare(cfg, None, on_event), None, on_event)


def resume(run: str | Path, *, overrides: Mapping[str, Any] | None = None, on_event: Event = _noop) -> dict[str, Any]:
    """Continue the run in folder ``run`` from its checkpoint, with its own settings.

    ``overrides`` holds settings the user gave explicitly; only those of
    :data:`clipret.config.RESUME_OVERRIDABLE` may differ from the run's (see
    :func:`clipret.training.resume.resumed_config`). With the world size it was
    saved with, the resumed run performs exactly the optimiser steps the
    original schedule had left, and ends with the same weights as an
    uninterrupted run. With another world size it goes on at the same point of
    the epoch plan and of the LR schedule (see :func:`clipret.training.resume.continue_at`).
    """
    on_event = on_event if runtime.is_main() else _noop
    out = Path(run)
    ckpt = artifacts.load_checkpoint(out / CHECKPOINT_NAME)
    cfg, changed = resumed_config(ckpt["config"], out, overrides)
    with groups.process_group(runtime.resolve_device(cfg.device)):
        _remove_stale_temps(out)
        return _run_resumed(prepare(cfg, ckpt, on_event), changed, on_event)  # the DDP model is gone before the group


def _run_resumed(state: TrainState, changed: dict[str, Any], on_event: Event) -> dict[str, Any]:
    resumed = {"step": state.step, "changed": changed, "world_size": (state.resumed_world_size, state.world_size)}
    return _run(state, resumed, on_event)


def _remove_stale_temps(out: Path) -> None:
    if runtime.is_main() and out.is_dir():
        artifacts.remove_stale_temps(out)


def _run(state: TrainState, resumed: dict[str, Any] | None, on_event: Event) -> dict[str, Any]:
    """Report the setup, train the remaining epochs, report and return the summary."""
    on_event("setup", _setup_payload(state, resumed))
    if state.step == 0 and not state.history and state.spec.pretrained.lower() not in NO_WEIGHTS:
        baseline = validate_start(state)  # metrics.jsonl's epoch-0 row
        if baseline is not None:
            _write_history(state)
            _report(on_event, "baseline", baseline)
    with runtime.catch_stop_signals(defer=True) as state.stop:  # SIGINT/SIGTERM: see clipret.training.stop
        for epoch in range(state.start_epoch, state.cfg.epochs):
            losses, seen, seconds = run_epoch(state, epoch, on_event)
            _report(on_event, "epoch", end_epoch(state, epoch, losses, seen / max(seconds, 1e-9)))
            if epoch + 1 < state.cfg.epochs and stop.asked(state):  # end_epoch has just checkpointed
                raise stop.stopped(state)
    best = state.best["epoch"]
    if best is None:  # with held-out images, only an epoch that failed validation is never the best
        raise ClipretError(f"no epoch gave finite (non-NaN) held-out embeddings, so no model was exported (see "
                           f"{state.out / METRICS_NAME}); train again with a lower --lr")
    summary = {"best_epoch": best, "best": next((r for r in state.history if r["epoch"] == best), {}),
               "out": str(state.out), "steps": state.step}
    on_event("done", summary)
    return summary


def _report(on_event: Event, kind: str, row: dict[str, Any]) -> None:
    """Report a validated row; first a warning if its held-out embeddings were not finite (an epoch
    row is reported all the same, the epoch-0 row is not: it has no scores to show)."""
    message = nonfinite_warning(row)
    if message:
        on_event("warning", {"message": message})
    if kind == "epoch" or not message:
        on_event(kind, row)


def _setup_payload(state: TrainState, resumed: dict[str, Any] | None) -> dict[str, Any]:
    cfg, data = state.cfg, state.data
    return {
        "n_images": len(data.ids), "n_train": len(data.train_idx), "n_val": len(data.val_idx),
        "n_classes": len(data.classes), "p": state.p, "k": cfg.k, "small_classes": state.sampler.small_classes,
        "warnings": state.warnings, "total_steps": state.total_steps, "start_step": state.step,
        "device": str(state.device), "amp": str(state.amp).replace("torch.", "") if state.amp is not None else "none",
        "workers": state.workers, "backbone": state.spec.backbone, "pretrained": state.spec.pretrained,
        "world_size": state.world_size, "batch": state.p * cfg.k * state.world_size,  # images per optimiser step
        # None, or {"step": steps already taken, "changed": {setting: (saved, new)}, "world_size": (saved, now)}
        "resumed": resumed,
        "excluded": [{"id": i, "reason": r} for i, r in sorted(data.excluded.items())],
    }


def run_epoch(state: TrainState, epoch: int, on_event: Event) -> tuple[list[float], int, float]:
    """Train one epoch (0-based) from ``state.start_batch`` if it is the first one resumed.

    Returns (the epoch's step losses, images seen by all ranks, seconds).
    """
    first = state.start_batch if epoch == state.start_epoch else 0
    losses = list(state.resumed_losses) if first else []  # the mean loss still covers the steps before a crash
    state.epoch_skipped = 0
    state.sampler.set_epoch(epoch, first)
    state.dataset.set_epoch(epoch)
    loader = DataLoader(state.dataset, batch_sampler=state.sampler, num_workers=state.workers, collate_fn=collate,
                        pin_memory=state.device.type == "cuda", generator=torch.Generator().manual_seed(state.cfg.seed + epoch))
    epoch_length = state.sampler.epoch_length(epoch)
    state.model.train()
    t_epoch, seen = time.perf_counter(), 0
    for batch_no, batch in enumerate(loader, start=first):
        _fault.maybe_signal(state.step + 1)
        t0 = time.perf_counter()
        if not _usable(state, batch, on_event):
            _stop_if_asked(state, epoch, batch_no + 1, losses, saved=False)
            continue
        info = train_step(state, batch, epoch)
        t1 = time.perf_counter()
        if info["finite"]:
            losses.append(info["loss"])
        else:
            state.epoch_skipped += 1
        if state.nonfinite_steps == 1:  # once per streak
            on_event("warning", {"message": f"skipped the update of step {state.step}: its loss, gradient or BatchNorm "
                                            "statistics were not finite (the weights and statistics were left as they were)"})
        seen += len(batch["indices"]) * state.world_size  # every rank took a batch of the same size
        if state.trace is not None:
            state.trace.record(state.step, state.model, info["loss"], t0, t1)
        _fault.maybe_fail(state.step)
        on_event("step", {"step": state.step, "total": state.total_steps, "epoch": epoch + 1,
                          "img_s": len(batch["indices"]) * state.world_size / max(t1 - t0, 1e-9), **info})
        saved = bool(state.cfg.save_every) and state.step % state.cfg.save_every == 0 and batch_no + 1 < epoch_length
        if saved:
            save_checkpoint(state, epoch, batch_no + 1, losses)
        _stop_if_asked(state, epoch, batch_no + 1, losses, saved=saved)
    return losses, seen, time.perf_counter() - t_epoch


def _stop_if_asked(state: TrainState, epoch: int, batch: int, losses: list[float], *, saved: bool) -> None:
    """After a batch: on a stop signal (any rank's), checkpoint here (unless just ``saved``) and stop."""
    if stop.asked(state):
        if not saved:
            save_checkpoint(state, epoch, batch, losses)
        raise stop.stopped(state)


def _usable(state: TrainState, batch: dict[str, Any], on_event: Event) -> bool:
    """Whether to train on ``batch``. One process trains on whatever images of it could be read.
    Under DDP every rank must bring a full P×K batch (the loss gathers equal shapes), so when an
    image failed to load on any rank, every rank skips this step together."""
    if state.world_size == 1:
        return batch["images"] is not None
    full = batch["images"] is not None and len(batch["indices"]) == state.p * state.cfg.k
    if groups.all_true(full, state.device):
        return True
    on_event("warning", {"message": f"skipped a step after step {state.step}: an image of it could not be read on some rank "
                                    "(under torchrun every rank needs a full P×K batch)"})
    return False


def end_epoch(state: TrainState, epoch: int, losses: list[float], img_per_s: float) -> dict[str, Any]:
    """Validate, export the model if it is the best so far, log and checkpoint; return the epoch's row.

    Every rank validates its share and gets the same scores (:func:`validate_epoch`), so every
    rank takes the same "best" decision; rank 0 writes.
    """
    lr, head_lr = state.last_lrs or current_lrs(state.optimizer)  # the LRs of the epoch's last step
    row: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": float(np.mean(losses)) if losses else None,
                           "lr": lr, "head_lr": head_lr, "mining": state.objective.mining(epoch), "img_per_s": img_per_s,
                           "skipped_steps": state.epoch_skipped}
    scores = validate_epoch(state)
    if scores is not None:
        row.update(scores)
        score = row.get("val_map@r", -math.inf)  # non-finite embeddings ("val_nonfinite"): a failure, never the best
    else:
        score = float(epoch)  # no validation: the last epoch is the one exported
    row["best"] = bool(score > state.best["score"])
    state.history.append(row)
    if row["best"]:
        state.best = {"epoch": epoch + 1, "score": score}
        if runtime.is_main():
            save_model(state.out, state.model, state.spec)
    _write_history(state)
    save_checkpoint(state, epoch + 1, 0, [])
    return row


def _write_history(state: TrainState) -> None:
    """Write metrics.jsonl (rank 0): one row per validated epoch so far."""
    if runtime.is_main():
        with artifacts.atomic_open(state.out / METRICS_NAME, "w") as fh:
            for r in state.history:
                fh.write(json.dumps(r) + "\n")
