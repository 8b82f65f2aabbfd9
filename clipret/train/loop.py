"""The training loop behind ``clipret train``.

One function, :func:`train`, drives everything; it reports through an
``on_event(kind, payload)`` callback so the CLI can draw progress without
the loop knowing about terminals. Kinds: "check" and "checked" (the up-front
image validation), "setup", "step", "epoch", "done".

The loop is written to be resumable and rank-aware: every random choice is
either seeded per epoch (sampler, loader) or captured in the checkpoint
(python/numpy/torch RNG), the sampler can start mid-epoch, and only rank 0
writes files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipret import artifacts, runtime
from clipret.config import TrainConfig
from clipret.data.dataset import ImageFolderDataset, collate
from clipret.data.layout import training_set
from clipret.data.sampler import PKBatchSampler, resolve_p
from clipret.data.transforms import AugmentConfig, eval_transform, train_transform
from clipret.data.validate import check_images
from clipret.errors import ClipretError
from clipret.inference import embed_images
from clipret.model.build import ModelSpec, build_encoder, create_encoder, make_spec, save_model
from clipret.train.llrd import param_groups
from clipret.train.losses import CircleObjective
from clipret.train.schedule import make_scheduler, warmup_steps_for
from clipret.train.split import stratified_split
from clipret.train.state import CHECKPOINT_NAME, capture_rng, restore_rng
from clipret.train.validate import leave_one_out

Event = Callable[[str, dict[str, Any]], None]
METRICS_NAME = "metrics.jsonl"
EXCLUDED_NAME = "excluded.json"  # training images left out by the validation pass, with reasons


def _noop(kind: str, payload: dict[str, Any]) -> None:
    pass


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, on_event: Event = _noop) -> dict[str, Any]:
    """Fine-tune a retrieval model on ``cfg.root``; write the run into ``cfg.out``.

    With ``resume=True`` the run continues from ``cfg.out/checkpoint.pt`` and
    performs exactly the optimizer steps the original schedule had left.
    Returns a summary dict (best epoch, its metrics, paths).
    """
    cfg.validate()
    if runtime.world_size() > 1:
        raise ClipretError("multi-process (torchrun) training is not supported yet; run a single process")
    out = Path(cfg.out)
    if not resume and not overwrite and ((out / CHECKPOINT_NAME).exists() or (out / artifacts.WEIGHTS_NAME).exists()):
        raise ClipretError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to replace it, or another --out")
    if runtime.is_main() and out.is_dir():
        artifacts.remove_stale_temps(out)
    ckpt = artifacts.load_checkpoint(out / CHECKPOINT_NAME) if resume else None
    if ckpt is not None:
        cfg = TrainConfig.from_dict({**ckpt["config"], "workers": cfg.workers, "device": cfg.device})
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    amp = runtime.resolve_amp(cfg.amp, device)

    ids, class_of, folder = training_set(cfg.root)
    on_event("check", {"total": len(ids)})
    bad = check_images(folder, ids, workers=max(1, cfg.workers), on_progress=lambda n: on_event("checked", {"n": n}))
    if bad:
        kept = [(i, c) for i, c in zip(ids, class_of) if i not in bad]
        ids, class_of = [i for i, _ in kept], [c for _, c in kept]
        if len(set(class_of)) < 2:
            raise ClipretError(f"after excluding {len(bad)} unreadable images, fewer than 2 classes are left in {folder}")
        if runtime.is_main():
            artifacts.write_json(out / EXCLUDED_NAME, [{"id": i, "reason": r} for i, r in sorted(bad.items())])
    class_names = sorted(set(class_of))
    class_index = {c: n for n, c in enumerate(class_names)}
    label_ids = np.array([class_index[c] for c in class_of], dtype=np.int64)
    train_idx, val_idx = stratified_split(class_of, cfg.val_split, cfg.seed)
    p, warn_p = resolve_p(len(np.unique(label_ids[train_idx])), cfg.p)

    if ckpt is not None:
        spec = ModelSpec.from_dict(ckpt["spec"])
        model = build_encoder(spec)
    else:
        spec = make_spec(cfg.model, cfg.pretrained, pool=cfg.pool, gem_input=cfg.gem_input,
                         embed_dim=cfg.embed_dim, dropout=cfg.dropout, image_size=cfg.image_size)
        model = create_encoder(spec)
    model.to(device)

    train_labels = label_ids[train_idx]
    sampler = PKBatchSampler(train_labels, p, cfg.k, seed=cfg.seed, rank=runtime.rank(), world_size=runtime.world_size())
    aug = AugmentConfig(cfg.aug_crop, cfg.aug_flip, cfg.aug_color_jitter, cfg.aug_grayscale, cfg.aug_erasing)
    train_ds = ImageFolderDataset(folder, [ids[i] for i in train_idx], train_transform(spec.preprocess, aug))
    objective = CircleObjective(cfg.circle_m, cfg.circle_gamma, cfg.miner_epsilon, cfg.mine_from_epoch)

    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.llrd, cfg.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    epoch_lengths = [sampler.epoch_length(e) for e in range(cfg.epochs)]
    total_steps = sum(epoch_lengths)
    if total_steps == 0:
        raise ClipretError(f"no full P×K batch fits the training set (P={p}, K={cfg.k}); lower --p or --k")
    scheduler = make_scheduler(optimizer, total_steps, warmup_steps_for(total_steps, cfg.warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)

    start_epoch, start_batch, step = 0, 0, 0
    best: dict[str, Any] = {"epoch": None, "score": -1.0}
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        best, history = dict(ckpt["best"]), list(ckpt["history"])
        restore_rng(ckpt["rng"])

    on_event("setup", {
        "n_images": len(ids), "n_train": len(train_idx), "n_val": len(val_idx), "n_classes": len(class_names),
        "p": p, "k": cfg.k, "small_classes": sampler.small_classes, "warnings": [w for w in [warn_p] if w],
        "total_steps": total_steps, "start_step": step, "device": str(device), "amp": str(amp).replace("torch.", ""),
        "backbone": spec.backbone, "pretrained": spec.pretrained,
        "excluded": [{"id": i, "reason": r} for i, r in sorted(bad.items())],
    })

    def checkpoint(epoch: int, batch: int, losses: list[float]) -> None:
        if not runtime.is_main():
            return
        artifacts.save_checkpoint(out / CHECKPOINT_NAME, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "step": step, "rng": capture_rng(),
            "best": best, "history": history, "config": cfg.to_dict(), "spec": spec.to_dict(), "classes": class_names,
            "epoch_losses": losses,
        })

    for epoch in range(start_epoch, cfg.epochs):
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + epoch))
        model.train()
        # the mean loss of an epoch resumed mid-way still covers the steps before the crash
        losses: list[float] = list(ckpt.get("epoch_losses", [])) if ckpt is not None and epoch == start_epoch and first else []
        t_epoch, seen = time.perf_counter(), 0
        for batch_no, batch in enumerate(loader, start=first):
            t0 = time.perf_counter()
            if batch["images"] is None:
                continue
            images = batch["images"].to(device, non_blocking=True)
            labels = torch.as_tensor(train_labels[batch["indices"].numpy()], device=device)
            with runtime.autocast(device, amp):
                emb = model(images)
            loss, info = objective(emb, labels, epoch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            seen += len(images)
            on_event("step", {"step": step, "total": total_steps, "epoch": epoch + 1, "loss": losses[-1],
                              "lr": optimizer.param_groups[-1]["lr"], "img_s": len(images) / max(time.perf_counter() - t0, 1e-9), **info})
            if cfg.save_every and step % cfg.save_every == 0 and batch_no + 1 < epoch_lengths[epoch]:
                checkpoint(epoch, batch_no + 1, losses)

        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                               "lr": optimizer.param_groups[-1]["lr"], "mining": objective.mining(epoch),
                               "img_per_s": seen / max(time.perf_counter() - t_epoch, 1e-9)}
        if len(val_idx):
            vecs, kept, _ = embed_images(model, folder, [ids[i] for i in val_idx], eval_transform(spec.preprocess),
                                         batch_size=p * cfg.k, workers=cfg.workers, device=device, amp=amp)
            by_id = dict(zip(ids, class_of))
            row.update(leave_one_out(vecs, [by_id[i] for i in kept]))
            score = row["val_map@r"]
        else:
            score = float(epoch)  # no validation: the last epoch is the one exported
        row["best"] = bool(score > best["score"])
        history.append(row)
        if row["best"]:
            best = {"epoch": epoch + 1, "score": score}
            if runtime.is_main():
                save_model(out, model, spec)
        if runtime.is_main():
            _write_history(out / METRICS_NAME, history)
        checkpoint(epoch + 1, 0, [])
        on_event("epoch", row)

    summary = {"best_epoch": best["epoch"], "best": next((r for r in history if r["epoch"] == best["epoch"]), {}),
               "out": str(out), "steps": step}
    on_event("done", summary)
    return summary


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    with artifacts.atomic_open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
