"""Everything a training run needs before its first step, in one :class:`TrainState`.

:func:`prepare` checks the settings (cheaply, before any image is read or
any weight downloaded), lists and checks the training images, splits them,
builds the model, sampler, optimiser and schedule, and restores a checkpoint
when resuming. The loop (:mod:`clipret.training.loop`) only steps it.
:func:`replace_run` clears the folder of an old run for ``--overwrite``.

Under torchrun (an active process group, see :mod:`clipret.parallel.groups`) every rank prepares
the same run: rank 0 checks the images and hands the verdicts to the others, every rank
builds the model (DDP then copies rank 0's weights), and the sampler gives each rank its own
batches of the shared epoch plan.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipret import artifacts, runtime
from clipret.artifacts.atomic import write_error
from clipret.artifacts.model import PENDING_NAME
from clipret.config import TrainConfig
from clipret.data.dataset import ImageFolderDataset
from clipret.data.decode import decode_side_for
from clipret.data.layout import training_set, validation_ids
from clipret.data.sampler import PKBatchSampler, resolve_p
from clipret.data.transforms import AugmentConfig, resolve_augmentation, train_transform
from clipret.data.validate import all_gray, check_images
from clipret.errors import ClipretError
from clipret.model.build import ModelSpec, build_encoder, create_encoder, make_spec
from clipret.parallel import groups
from clipret.training import ddp
from clipret.training.fast import CompiledForward, apply_memory_paths, uses_channels_last
from clipret.training.llrd import param_groups
from clipret.training.losses import Objective
from clipret.training.resume import continue_at
from clipret.training.schedule import make_scheduler, move_to_step, warmup_steps_for
from clipret.training.split import stratified_split
from clipret.training.state import CHECKPOINT_NAME, METRICS_NAME, restore_rng, restore_scaler
from clipret.training.trace import StepTrace

Event = Callable[[str, dict[str, Any]], None]
EXCLUDED_NAME = "excluded.json"  # training images left out by the validation pass, with reasons


@dataclass
class TrainData:
    """The training set after the image check: ids, classes and the train/val split."""

    folder: Path
    ids: list[str]  # every kept image of ROOT/training, sorted
    class_of: list[str]  # class name of each id
    classes: list[str]  # sorted class names; a label is an index into this
    train_idx: np.ndarray  # (n_train,) int64 positions in ids
    val_idx: np.ndarray  # (n_val,) int64 positions in ids
    train_labels: np.ndarray  # (n_train,) int64 class index of each training image
    excluded: dict[str, str]  # unreadable id -> reason

    def ids_digest(self) -> str:
        """Digest of the training ids, to check that a resumed run sees the same images."""
        return artifacts.sha256_text("\n".join(self.ids[i] for i in self.train_idx))


@dataclass
class TrainState:
    """The run being trained, and where it stands (``step`` optimiser steps taken)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    amp: torch.dtype | None
    workers: int
    data: TrainData
    spec: ModelSpec
    model: nn.Module  # the RetrievalNet itself: saved, checkpointed, validated
    forward: Callable[[torch.Tensor], torch.Tensor]  # what a training step calls: model, in DDP, compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    sampler: PKBatchSampler
    dataset: ImageFolderDataset
    objective: Objective
    p: int
    total_steps: int
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1  # ranks training together; each step sees p * k * world_size images
    channels_last: bool = False  # convert input batches to channels-last
    trace: StepTrace | None = None  # per-step trace (CLIPRET_TRAIN_TRACE), off by default
    resumed_world_size: int | None = None  # the world size of the checkpoint this run resumed from
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "score": -1.0})
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_losses: list[float] = field(default_factory=list)  # losses of the interrupted epoch before the crash
    last_lrs: tuple[float, float] | None = None  # (base LR, head LR) of the last step taken
    nonfinite_steps: int = 0  # steps in a row whose gradient was not finite (their update was skipped)
    epoch_skipped: int = 0  # such steps in this epoch (since this session's start of it)
    stop: runtime.StopRequest = field(default_factory=runtime.StopRequest)  # SIGINT/SIGTERM caught (clipret.training.stop)


def probe_spec(cfg: TrainConfig) -> ModelSpec:
    """The model spec of a new run, read from the open_clip config only (no weights, no images).

    Raises :class:`ClipretError` for settings the backbone cannot take (``--pool cls`` on a ResNet).
    """
    return make_spec(cfg.model, cfg.pretrained, pool=cfg.pool, gem_input=cfg.gem_input,
                     embed_dim=cfg.embed_dim, dropout=cfg.dropout, head_bn=cfg.head_bn, image_size=cfg.image_size)


def load_data(cfg: TrainConfig, workers: int | None, on_event: Event) -> TrainData:
    """List ``ROOT/training``, leave out unreadable images, and split train/val.

    Under torchrun rank 0 checks the images (through the cache of verdicts, as one process
    does) while the others wait for its verdicts, for as long as that takes.
    """
    ids, class_of, folder, unusable = training_set(cfg.root)

    def check() -> dict[str, str]:
        on_event("check", {"total": len(ids)})
        threads = max(1, runtime.resolve_workers(workers, len(ids)))
        return check_images(folder, ids, workers=threads, on_progress=lambda n: on_event("checked", {"n": n}))

    with groups.work_group() as group:
        bad = groups.from_main(check, group)
    if bad:
        kept = [(i, c) for i, c in zip(ids, class_of) if i not in bad]
        ids, class_of = [i for i, _ in kept], [c for _, c in kept]
        if len(set(class_of)) < 2:
            raise ClipretError(f"after excluding {len(bad)} unreadable images, fewer than 2 classes are left in {folder}")
    val_ids = validation_ids(cfg.root)  # a dataset CSV's validation rows; else --val-split of the folder
    if val_ids is None:
        train_idx, val_idx = stratified_split(class_of, cfg.val_split, cfg.seed)
    else:
        is_val = np.array([i in val_ids for i in ids], dtype=bool)
        train_idx, val_idx = np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)
    classes = sorted(set(class_of))
    index = {c: n for n, c in enumerate(classes)}
    train_labels = np.array([index[class_of[i]] for i in train_idx], dtype=np.int64)
    return TrainData(folder, ids, class_of, classes, train_idx, val_idx, train_labels, {**unusable, **bad})


def augmentation_for(cfg: TrainConfig, spec: ModelSpec, data: TrainData) -> AugmentConfig:
    """The run's augmentation: the settings given, the rest chosen from the input size and
    whether the training images are gray (:func:`clipret.data.transforms.resolve_augmentation`)."""
    size = spec.preprocess["size"]
    size = min(size) if isinstance(size, (list, tuple)) else int(size)
    gray = None in (cfg.aug_color_jitter, cfg.aug_grayscale) and all_gray(data.folder, [data.ids[i] for i in data.train_idx],
                                                                          seed=cfg.seed)
    return resolve_augmentation(size, gray, crop=cfg.aug_crop, flip=cfg.aug_flip, color_jitter=cfg.aug_color_jitter,
                                grayscale=cfg.aug_grayscale, erasing=cfg.aug_erasing, crop_scale=cfg.aug_crop_scale)


def prepare(cfg: TrainConfig, ckpt: dict[str, Any] | None, on_event: Event) -> TrainState:
    """Build the run from ``cfg`` (new) or from ``cfg`` and its checkpoint (resumed)."""
    cfg.validate()
    spec = ModelSpec.from_dict(ckpt["spec"]) if ckpt is not None else probe_spec(cfg)
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    amp = runtime.resolve_amp(cfg.amp, device)
    out = Path(cfg.out)
    rank, world_size = runtime.rank(), runtime.world_size()

    data = load_data(cfg, cfg.workers, on_event)
    if ckpt is not None and ckpt.get("train_ids") not in (None, data.ids_digest()):
        raise ClipretError(f"the training images under {cfg.root} are not the ones this run started with; "
                           "resume with the original data, or start a new run")
    if data.excluded and runtime.is_main():
        artifacts.write_json(out / EXCLUDED_NAME, [{"id": i, "reason": r} for i, r in sorted(data.excluded.items())])
    workers = runtime.resolve_workers(cfg.workers, len(data.train_idx))
    if cfg.workers is None:  # automatic: the ranks of a node share its CPUs
        workers = min(workers, runtime.cpus_per_rank())
    p, warn_p = resolve_p(len(np.unique(data.train_labels)), cfg.p)

    warnings = [w for w in [warn_p] if w]
    model = build_encoder(spec) if ckpt is not None else create_encoder(spec, warnings)
    model.to(device)
    warnings += apply_memory_paths(model, device, grad_checkpointing=cfg.grad_checkpointing,
                                   channels_last=cfg.channels_last, tf32=cfg.tf32)
    if rank > 0:  # every rank built the same weights; from here on (dropout) each draws its own numbers
        runtime.seed_everything(ddp.rank_seed(cfg.seed, rank))
    trained = ddp.wrap(model, device)
    forward = CompiledForward(trained, lambda m: on_event("warning", {"message": m})) if cfg.compile else trained
    sampler = PKBatchSampler(data.train_labels, p, cfg.k, seed=cfg.seed, rank=rank, world_size=world_size, with_draws=True)
    aug = augmentation_for(cfg, spec, data)
    dataset = ImageFolderDataset(data.folder, [data.ids[i] for i in data.train_idx],
                                 train_transform(spec.preprocess, aug), seed=cfg.seed,
                                 decode_side=decode_side_for(spec.preprocess["size"], cfg.exact_decode))
    objective = Objective(cfg.circle_m, cfg.circle_gamma, cfg.miner_epsilon, cfg.mine_from_epoch, loss=cfg.loss,
                          num_classes=len(data.classes), embed_dim=spec.embed_dim).to(device)
    param_sets = param_groups(model, cfg.lr, cfg.weight_decay, cfg.resolved_llrd(spec.pretrained), cfg.head_lr_mult)
    if objective.parameters():  # ArcFace's class proxies learn at the head's LR, without weight decay
        param_sets.append({"name": "loss.no_decay", "params": objective.parameters(), "lr": cfg.lr * cfg.head_lr_mult,
                       "lr_scale": cfg.head_lr_mult, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(param_sets, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    total_steps = sampler.epoch_length(0) * cfg.epochs
    if total_steps == 0:
        raise ClipretError(f"no full P×K batch per process fits the training set (P={p}, K={cfg.k}, "
                           f"{world_size} processes); lower --classes-per-batch (--p) or --images-per-class (--k), "
                           "or use fewer processes")
    scheduler = make_scheduler(optimizer, total_steps, warmup_steps_for(total_steps, cfg.warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    state = TrainState(cfg, out, device, amp, workers, data, spec, model, forward, optimizer, scheduler, scaler,
                       sampler, dataset, objective, p, total_steps, warnings=warnings, world_size=world_size,
                       channels_last=uses_channels_last(model, cfg.channels_last), trace=StepTrace.from_env())
    if ckpt is not None:
        restore(state, ckpt)
    return state


def restore(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Load weights, optimiser, schedule, RNG and progress from a checkpoint.

    A checkpoint of the same world size continues exactly where it stopped, each rank with
    its own RNG state. One written by another number of ranks continues at the same point of
    the epoch plan and of the LR schedule (:func:`clipret.training.resume.continue_at`).
    """
    state.model.load_state_dict(ckpt["model"])
    if ckpt.get("objective"):
        state.objective.load_state_dict(ckpt["objective"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    restore_scaler(state.scaler, ckpt["scaler"])
    state.best, state.history = dict(ckpt["best"]), list(ckpt["history"])
    saved_world = int(ckpt.get("world_size", 1))
    state.resumed_world_size = saved_world
    state.start_epoch, state.start_batch, state.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
    if saved_world != state.world_size:
        state.start_batch, state.step = continue_at(ckpt["epoch"], ckpt["batch"], saved_world, state.world_size,
                                                    state.sampler.epoch_length(ckpt["epoch"]))
        move_to_step(state.scheduler, state.step)
    state.resumed_losses = list(ckpt.get("epoch_losses", [])) if state.start_batch else []
    state.last_lrs = tuple(ckpt["last_lrs"]) if ckpt.get("last_lrs") and state.start_batch else None  # type: ignore[assignment]
    rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
    rank = runtime.rank()
    if rank < len(rngs):
        restore_rng(rngs[rank], state.device)
    else:  # a rank the saved run did not have: a fresh stream of its own
        runtime.seed_everything(ddp.rank_seed(state.cfg.seed + state.step, rank))


def replace_run(cfg: TrainConfig) -> None:
    """``--overwrite``: check the settings, then take the old run in ``cfg.out`` away before the new
    run writes anything, so that a new run killed early leaves no old checkpoint to ``--resume``.

    The folder is renamed to a hidden sibling (``.OUT.removed-PID``, one atomic step), a fresh
    empty one takes its place, and the renamed one is deleted. A folder that holds files
    ``clipret train`` did not write is refused (one line), and so is the working directory or
    a folder above it. Under torchrun rank 0 calls this before any rank writes.
    """

    cfg.validate()
    probe_spec(cfg)  # settings the backbone cannot take fail before anything is deleted
    out = Path(cfg.out).resolve()  # a symlinked --out: the folder it points to
    prefix = f".{out.name}.removed-"
    for old in out.parent.iterdir() if out.parent.is_dir() else ():  # left by an --overwrite killed before it finished
        if old.name.startswith(prefix) and old.name[len(prefix):].isdigit():
            shutil.rmtree(old, ignore_errors=True)
    if not out.is_dir():
        return
    artifacts.remove_stale_temps(out)  # what a killed writer left; a live one's temp files stay and are refused below
    names = {entry.name for entry in out.iterdir()}
    run_files = {CHECKPOINT_NAME, artifacts.WEIGHTS_NAME, artifacts.CONFIG_NAME, PENDING_NAME, METRICS_NAME, EXCLUDED_NAME}
    if not names & run_files:
        return  # no run to replace: leave the folder as it is
    foreign = sorted(names - run_files)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ClipretError(f"--overwrite would delete {out}, which also holds files clipret train did not write ({shown}); "
                           "move them out of it, or pass another --out")
    cwd = Path.cwd().resolve()
    if cwd == out or out in cwd.parents:
        raise ClipretError(f"--overwrite cannot replace {out}: the working directory is inside it; run from another folder")
    aside = out.with_name(f"{prefix}{os.getpid()}")
    mode = out.stat().st_mode & 0o7777
    try:
        os.replace(out, aside)
        out.mkdir(mode=mode)
        os.chmod(out, mode)  # mkdir's mode passes through the umask
    except OSError as exc:
        raise write_error(out, exc) from None
    shutil.rmtree(aside, ignore_errors=True)
