"""``clipret demo``: run the whole pipeline offline on a drawn dataset."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from clipret.cli import _console
from clipret.cli._options import Json


@_console.handle_errors
def demo_command(
    workdir: Annotated[Path, typer.Option("--dir", help="Where to put the data, the run and the outputs.")] = Path("clipret-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs for the tiny model.")] = 18,
    seed: Annotated[int, typer.Option(help="Seed of the drawn dataset and of the training run.")] = 0,
    as_json: Json = False,
) -> None:
    """Draw a small shapes-and-textures dataset, train a tiny random-init model on the CPU,
    then embed, query and evaluate it. Works offline; about a minute on 2 cores.

    Example:

      clipret demo --dir /tmp/clipret-demo
    """
    from clipret.demo import run_demo

    t0 = time.perf_counter()
    state: dict[str, Any] = {}
    bars = contextlib.ExitStack()

    def on_train(kind: str, payload: dict[str, Any]) -> None:
        if kind == "setup":
            state["advance"] = bars.enter_context(_console.progress_bar(payload["total_steps"], "train", "epoch", "loss"))
        elif kind == "step":
            state["advance"](1, epoch=payload["epoch"], loss=f"{payload['loss']:.2f}")
        elif kind == "done":
            bars.close()

    with bars:
        metrics = run_demo(workdir, epochs=epochs, seed=seed, on_stage=lambda s: _console.info(s, label="$"),
                           on_train_event=on_train)
    _console.print_metrics(metrics, "clipret demo: query vs gallery", as_json)
    _console.info(f"demo finished in {time.perf_counter() - t0:.0f}s; R@1 {metrics['recall@1']:.3f} vs chance {metrics['chance_recall@1']:.3f}")
