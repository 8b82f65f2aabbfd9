"""What ``clipret train`` shows while it runs: the training loop's events as lines and progress bars."""

from __future__ import annotations

import contextlib
from typing import Any

from clipret.cli import _console


def run_with_progress(start: Any) -> None:
    """Run ``start(on_event)``, drawing its events: the image check, the setup lines, a bar over the
    steps, a line per epoch, warnings; on rank 0, the best epoch at the end."""
    state: dict[str, Any] = {}
    bars, checking = contextlib.ExitStack(), contextlib.ExitStack()

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "check":
            state["checked"] = checking.enter_context(_console.progress_bar(payload["total"], "check images"))
        elif kind == "checked":
            state["checked"](payload["n"])
        elif kind == "setup":
            checking.close()  # one live bar at a time
            _setup_lines(payload)
            bar = _console.progress_bar(payload["total_steps"], "train", "epoch", "loss", "lr", "head_lr", "img/s")
            state["advance"] = bars.enter_context(bar)
            if payload["start_step"]:
                state["advance"](payload["start_step"])
        elif kind == "step":
            state["advance"](1, epoch=payload["epoch"], loss=f"{payload['loss']:.3f}", lr=f"{payload['lr']:.2e}",
                             head_lr=f"{payload['head_lr']:.2e}", **{"img/s": f"{payload['img_s']:.0f}"})
        elif kind == "epoch":
            val = f", val R@1 {payload['val_recall@1']:.3f}, MAP@R {payload['val_map@r']:.3f}" if "val_map@r" in payload else ""
            if "val_nonfinite" in payload:
                val = ", val failed (non-finite embeddings)"
            loss = "–" if payload["train_loss"] is None else f"{payload['train_loss']:.4f}"  # None: no finite step
            _console.info(f"epoch {payload['epoch']}: loss {loss}{val}{' (best)' if payload['best'] else ''}")
        elif kind == "baseline":
            _console.info(f"before training (the starting weights): val R@1 {payload['val_recall@1']:.3f}, "
                          f"MAP@R {payload['val_map@r']:.3f}")
        elif kind == "warning":
            _console.warn(payload["message"])

    with bars, checking:
        summary = start(on_event)  # on ranks other than 0 no event comes
    from clipret import runtime

    if runtime.is_main():
        _console.info(f"best epoch {summary['best_epoch']}; model written to {summary['out']}")


def _shown(value: Any) -> Any:
    return "auto" if value is None else value  # workers None is the automatic choice


def _setup_lines(payload: dict[str, Any]) -> None:
    resumed = payload["resumed"]
    if resumed is not None:
        changed = resumed["changed"]
        what = "; overridden: " + ", ".join(f"{n.replace('_', '-')} {_shown(new)} (was {_shown(old)})"
                                            for n, (old, new) in changed.items()) if changed else ""
        done = "; it had finished, nothing is left to train" if resumed["step"] >= payload["total_steps"] else ""
        saved_world, world = resumed.get("world_size") or (None, None)
        ranks = (f"; it ran on {saved_world} process(es), now {world}: it goes on at the same point of the schedule, "
                 "not bit for bit as an uninterrupted run") if saved_world not in (None, world) else ""
        _console.info(f"resuming at step {resumed['step']} of {payload['total_steps']} with the run's settings{what}{ranks}{done}")
    world = payload.get("world_size", 1)
    batch = f"P×K = {payload['p']}×{payload['k']}" + (f" per process × {world} processes = {payload['batch']} images per step"
                                                      if world > 1 else "")
    where = f"{world} processes ({payload['device']} on rank 0)" if world > 1 else payload["device"]
    _console.info(
        f"training {payload['backbone']} ({payload['pretrained']}) on {payload['n_train']} images, "
        f"{payload['n_classes']} classes, {payload['n_val']} held out; {batch}; "
        f"{payload['total_steps']} steps on {where} (amp: {payload['amp']}, workers: {payload['workers']})"
    )
    for w in payload["warnings"]:
        _console.warn(w)
    _console.report_unreadable(payload["excluded"], "excluded", "training image")
    if payload["small_classes"]:
        _console.warn(f"{payload['small_classes']} classes have fewer than K images; they are sampled with replacement")
