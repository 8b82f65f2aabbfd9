"""``clipret train ROOT``: fine-tune an OpenCLIP image tower for retrieval."""

from __future__ import annotations

import contextlib
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Amp, Device, Model, Pretrained, Seed, Workers

_HELP = """Fine-tune an OpenCLIP backbone on ROOT/training/<class>/* for retrieval.

GeM pooling + a 512-d head, Circle loss with a MultiSimilarity miner,
P×K batches, AdamW with layer-wise LR decay and warmup-cosine.

Writes OUT/model.safetensors + OUT/config.json (best epoch), OUT/metrics.jsonl
and a resumable OUT/checkpoint.pt.

Example:

  clipret train ./data --model ViT-B-16 --pretrained openai --epochs 10 --out runs/b16
"""


def _load_toml(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: values from the TOML file become defaults, so flags still override them."""
    if value is None:
        return value
    from clipret.config import TrainConfig, read_toml

    values = read_toml(value)
    names = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - names - {"root"})
    if unknown:
        known = sorted({f.name for f in fields(TrainConfig)} & names)
        _console.fail(f"{value}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


@_console.handle_errors
def train_command(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="Dataset root holding training/<class>/* (or the class folders themselves).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/clipret"),
    model: Model = "ViT-L-14",
    pretrained: Pretrained = None,
    pool: Annotated[str, typer.Option(help="Pooling: gem, cls or mean.")] = "gem",
    gem_input: Annotated[str, typer.Option(help="How GeM makes ViT tokens non-negative: clamp (measured best, docs/gem.md), softplus or shift.")] = "clamp",
    embed_dim: Annotated[int, typer.Option(help="Output embedding size.")] = 512,
    dropout: Annotated[float, typer.Option(help="Dropout in the head.")] = 0.1,
    image_size: Annotated[Optional[int], typer.Option(help="Input size; default: the model's own.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    p: Annotated[int, typer.Option("--p", help="Classes per batch (P).")] = 32,
    k: Annotated[int, typer.Option("--k", help="Images per class per batch (K).")] = 4,
    lr: Annotated[float, typer.Option(help="Base learning rate (top transformer block).")] = 4e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases, norms, GeM p).")] = 0.05,
    llrd: Annotated[float, typer.Option(help="Layer-wise LR decay per block going down.")] = 0.65,
    head_lr_mult: Annotated[float, typer.Option(help="LR multiplier for the head and pooling.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warmup: fraction of all steps (or a step count if >= 1).")] = 0.15,
    mine_from_epoch: Annotated[int, typer.Option(help="Epoch (1-based) from which the MultiSimilarity miner is on.")] = 5,
    aug_crop: Annotated[bool, typer.Option(help="Random resized crop.")] = True,
    aug_flip: Annotated[bool, typer.Option(help="Random horizontal flip.")] = True,
    aug_color_jitter: Annotated[float, typer.Option(help="Colour jitter strength; 0 turns it off.")] = 0.2,
    aug_grayscale: Annotated[float, typer.Option(help="Random grayscale probability; 0 turns it off.")] = 0.1,
    aug_erasing: Annotated[float, typer.Option(help="Random erasing probability; 0 turns it off.")] = 0.25,
    amp: Amp = "auto",
    val_split: Annotated[float, typer.Option(help="Validation fraction, stratified per class; 0 turns validation off.")] = 0.1,
    workers: Workers = 4,
    device: Device = "auto",
    seed: Seed = 0,
    save_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: epoch ends only).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="TOML file of options (keys as option names); flags override it.",
                     is_eager=True, callback=_load_toml),
    ] = None,
) -> None:
    # The help text is _HELP (see the bottom of this module).
    values = {k_: v for k_, v in locals().items() if k_ not in {"ctx", "resume", "overwrite", "config"}}
    values["root"], values["out"] = str(root), str(out)
    from clipret.config import TrainConfig

    _run(TrainConfig.from_dict(values), resume, overwrite)


def _run(cfg: Any, resume: bool, overwrite: bool) -> None:
    from clipret.train.loop import train

    state: dict[str, Any] = {}
    bars, checking = contextlib.ExitStack(), contextlib.ExitStack()

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "check":
            state["checked"] = checking.enter_context(_console.progress_bar(payload["total"], "check images"))
        elif kind == "checked":
            state["checked"](payload["n"])
        elif kind == "setup":
            checking.close()  # one live bar at a time
            _console.info(
                f"training {payload['backbone']} ({payload['pretrained']}) on {payload['n_train']} images, "
                f"{payload['n_classes']} classes, {payload['n_val']} held out; P×K = {payload['p']}×{payload['k']}; "
                f"{payload['total_steps']} steps on {payload['device']} (amp: {payload['amp']})"
            )
            for w in payload["warnings"]:
                _console.warn(w)
            _console.report_unreadable(payload["excluded"], "excluded", "training image")
            if payload["small_classes"]:
                _console.warn(f"{payload['small_classes']} classes have fewer than K images; they are sampled with replacement")
            bar = _console.progress_bar(payload["total_steps"], "train", "epoch", "loss", "lr", "img/s")
            state["advance"] = bars.enter_context(bar)
            if payload["start_step"]:
                state["advance"](payload["start_step"])
        elif kind == "step":
            state["advance"](1, epoch=payload["epoch"], loss=f"{payload['loss']:.3f}", lr=f"{payload['lr']:.2e}",
                             **{"img/s": f"{payload['img_s']:.0f}"})
        elif kind == "epoch":
            val = f", val R@1 {payload['val_recall@1']:.3f}, MAP@R {payload['val_map@r']:.3f}" if "val_map@r" in payload else ""
            _console.info(f"epoch {payload['epoch']}: loss {payload['train_loss']:.4f}{val}{' (best)' if payload['best'] else ''}")

    with bars, checking:
        summary = train(cfg, resume=resume, overwrite=overwrite, on_event=on_event)
    _console.info(f"best epoch {summary['best_epoch']}; model written to {summary['out']}")


train_command.__doc__ = _HELP
