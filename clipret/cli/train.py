"""``clipret train ROOT``: fine-tune an OpenCLIP image tower for retrieval; ``--resume RUN`` continues a run."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Amp, Device, ExactDecode, Model, Seed, Workers
from clipret.config import COMMAND_LINE_ONLY, GEM_INPUTS, LOSSES, POOLS

_HELP = """Fine-tune an OpenCLIP backbone on ROOT/training/<class>/* for retrieval.

GeM pooling + an --embed-dim head, Circle loss with a MultiSimilarity miner,
P×K batches, AdamW with layer-wise LR decay and warmup-cosine.

Writes OUT/model.safetensors + OUT/config.json (best epoch), OUT/metrics.jsonl
and a resumable OUT/checkpoint.pt.

Example:

  clipret train ./data --model ViT-B-16 --pretrained openai --epochs 10 --out runs/b16

Continue an interrupted run with its own settings (data root included):

  clipret train --resume runs/b16

Ctrl-C (or SIGTERM) finishes the step in progress, writes a checkpoint, prints
that command and exits (130; 143 on SIGTERM).

On several GPUs, the same command under torchrun (one process per GPU; each
optimiser step sees P×K images per GPU, and --lr is used as given; write P and K
as --classes-per-batch and --images-per-class, since torchrun takes --p for its own):

  torchrun --nproc_per_node 8 -m clipret train ./data --model ViT-L-14 --classes-per-batch 32 --images-per-class 4 --out runs/l14
"""

Pool = enum.Enum("Pool", {v: v for v in POOLS}, type=str)  # type: ignore[misc]
GemInput = enum.Enum("GemInput", {v: v for v in GEM_INPUTS}, type=str)  # type: ignore[misc]
Loss = enum.Enum("Loss", {v: v for v in LOSSES}, type=str)  # type: ignore[misc]
_NOT_SETTINGS = {"ctx", *COMMAND_LINE_ONLY}
Pretrained = Annotated[Optional[str], typer.Option(
    help="Starting weights: a tag (openai, laion2b_s32b_b82k), a local .safetensors/.pt file, TAG=FILE (a local file "
         "holding that tag's weights, e.g. openai=/w/ViT-L-14.safetensors), a run folder written by clipret train "
         "or its model.safetensors (the tower starts from that run's, the head too where its shape fits), or none. "
         "A --model config JSON without a usual tag starts from random weights unless weights are given here.",
    show_default="the model's usual tag")]


@_console.handle_errors
def _load_toml(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: values from the TOML file become defaults, so flags still override them."""
    if value is None:
        return value
    from clipret.config import read_toml

    ctx.default_map = {**(ctx.default_map or {}), **read_toml(value, _toml_keys(ctx.command))}
    return value


def _toml_keys(command: Any) -> dict[str, str]:
    """Every key a --config file may use, in underscore form -> its setting: ROOT, and each option's
    long names (``images_per_class`` and ``k`` -> ``k``)."""
    keys = {"root": "root"}
    for param in command.params:
        keys.update({opt[2:].replace("-", "_"): param.name for opt in param.opts if opt.startswith("--")})
    return keys


@_console.handle_errors
def train_command(
    ctx: typer.Context,
    root: Annotated[Optional[Path], typer.Argument(
        help="Dataset root holding training/<class>/* (or the class folders themselves). "
             "With --resume and no --out: the run folder to continue.",
        show_default=False, metavar="ROOT")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/clipret"),
    model: Model = "ViT-L-14",
    pretrained: Pretrained = None,
    pool: Annotated[Pool, typer.Option(help="Pooling of the tower's tokens (cls: ViT only).")] = Pool.gem,
    gem_input: Annotated[GemInput, typer.Option(
        help="How GeM makes ViT tokens non-negative. clamp did best in the one measurement so far, "
             "on random-init tiny ViTs (docs/gem.md); CNN towers always clamp.")] = GemInput.clamp,
    embed_dim: Annotated[int, typer.Option(help="Output embedding size (the head's width).")] = 512,
    dropout: Annotated[float, typer.Option(help="Dropout in the head.")] = 0.1,
    head_bn: Annotated[bool, typer.Option(help="BatchNorm1d in the head, after its linear layer.")] = True,
    image_size: Annotated[Optional[int], typer.Option(help="Input size.", show_default="the model's own")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs; an epoch is about one pass over the training images.")] = 15,
    p: Annotated[int, typer.Option("--p", "--classes-per-batch", help=(
        "Classes per P×K batch (P), per process. Under torchrun write --classes-per-batch: torchrun's own "
        "parser mistakes --p for its --print-completion."))] = 32,
    k: Annotated[int, typer.Option("--k", "--images-per-class", help="Images per class in a P×K batch (K); not a top-k.")] = 4,
    lr: Annotated[float, typer.Option(help="Base learning rate (top transformer block).")] = 4e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases, norms, GeM p).")] = 0.05,
    llrd: Annotated[Optional[float], typer.Option(
        help="Layer-wise LR decay per block going down. Default: 0.65 when the tower starts from pretrained weights, "
             "1 (no decay) from random init.", show_default="auto")] = None,
    head_lr_mult: Annotated[float, typer.Option(help="LR multiplier for the head and pooling.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warmup: fraction of all steps (or a step count if >= 1).")] = 0.15,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 1.0,
    loss: Annotated[Loss, typer.Option(
        help="Metric loss (pytorch-metric-learning): circle, multisimilarity, or arcface (class proxies; no miner).")] = Loss.circle,
    circle_m: Annotated[float, typer.Option(help="Circle loss relaxation margin m.")] = 0.4,
    circle_gamma: Annotated[float, typer.Option(
        help="Circle loss scale gamma (32: better MAP@R than the seed's 80 in docs/benchmarks.md).")] = 32.0,
    miner_epsilon: Annotated[float, typer.Option(help="MultiSimilarity miner margin epsilon.")] = 0.1,
    mine_from_epoch: Annotated[int, typer.Option(help="Epoch (1-based) from which the MultiSimilarity miner is on.")] = 5,
    aug_crop: Annotated[Optional[bool], typer.Option(
        help="Random resized crop; off: resize and centre crop. Default: on for inputs of 128 px and more, off below.",
        show_default="auto")] = None,
    aug_crop_scale: Annotated[float, typer.Option(
        help="Smallest crop area of the random resized crop (fraction of the image).")] = 0.5,
    aug_flip: Annotated[bool, typer.Option(help="Random horizontal flip.")] = True,
    aug_color_jitter: Annotated[Optional[float], typer.Option(
        help="Colour jitter strength; 0 turns it off. Default: 0.2, or 0 when the training images are gray.",
        show_default="auto")] = None,
    aug_grayscale: Annotated[Optional[float], typer.Option(
        help="Random grayscale probability; 0 turns it off. Default: 0.1, or 0 when the training images are gray.",
        show_default="auto")] = None,
    aug_erasing: Annotated[Optional[float], typer.Option(
        help="Random erasing probability; 0 turns it off. Default: 0.25 for inputs of 128 px and more, 0 below.",
        show_default="auto")] = None,
    amp: Amp = "auto",
    val_split: Annotated[float, typer.Option(help="Validation fraction, stratified per class; 0 turns validation off.")] = 0.1,
    workers: Workers = None,
    device: Device = "auto",
    seed: Seed = 0,
    save_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: epoch ends only).")] = 0,
    exact_decode: ExactDecode = False,
    grad_checkpointing: Annotated[bool, typer.Option(
        help="Recompute each ViT block in the backward pass instead of storing its activations: less GPU memory, "
             "about a third more compute. No effect on ResNet towers.")] = False,
    channels_last: Annotated[bool, typer.Option(
        help="Channels-last (NHWC) memory layout for CNN (RN*) towers; faster convolutions on recent GPUs.")] = False,
    compile: Annotated[bool, typer.Option(
        help="torch.compile the training forward (slow first step); falls back to eager, with a warning, if compiling fails.")] = False,
    tf32: Annotated[bool, typer.Option(
        help="Let float32 matmuls and convolutions on CUDA use TF32 tensor cores.")] = True,
    resume: Annotated[bool, typer.Option(
        help="Continue a run from its checkpoint, with its own settings: `--resume RUN` or `ROOT --out RUN --resume`. "
             "Only --workers, --device, --amp, --save-every, the speed switches (--grad-checkpointing, --channels-last, "
             "--compile, --tf32) and ROOT may be given anew; under torchrun the number of processes may change.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the run in --out: its folder is moved aside and deleted as the new run starts (refused if it "
             "also holds files train did not write). Command line only, never from --config.")] = False,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="TOML file of options (keys: the options' long names, with dashes or "
                     "underscores; not --overwrite or --resume); flags override it.", show_default="none",
                     is_eager=True, callback=_load_toml),
    ] = None,
) -> None:
    # The help text is _HELP (see the bottom of this module).
    values = {k_: v for k_, v in locals().items() if k_ not in _NOT_SETTINGS}
    values = {k_: (v.value if isinstance(v, enum.Enum) else str(v) if isinstance(v, Path) else v) for k_, v in values.items()}
    if resume:
        if overwrite:
            _console.fail("--resume continues a run and --overwrite replaces it; pass one of them")
        _resume(ctx, values)
        return
    if root is None:
        _console.fail("missing ROOT, the dataset folder (or pass --resume RUN to continue a run)")
    _run(lambda on_event: _train_new(values, overwrite, on_event))


def _explicit(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line or in --config, not left at their defaults."""
    return {name: v for name, v in values.items()
            if (src := ctx.get_parameter_source(name)) is not None and src.name in {"COMMANDLINE", "DEFAULT_MAP", "ENVIRONMENT"}}


def _resume(ctx: typer.Context, values: dict[str, Any]) -> None:
    """``--resume RUN`` (ROOT names the run when --out is not given) or ``ROOT --out RUN --resume``."""
    given = _explicit(ctx, values)
    if "out" in given or values["root"] is None:
        run = Path(values["out"])
    else:
        run = Path(given.pop("root"))
        if not (run / "checkpoint.pt").is_file():
            _console.fail(f"nothing to resume: no checkpoint at {run / 'checkpoint.pt'}; pass the run folder "
                          "(clipret train --resume RUN), or ROOT --out RUN --resume")
    given.pop("out", None)
    from clipret.api import train

    _run(lambda on_event: train(given.pop("root", None), out=run, resume=True, progress=on_event, **given))


def _train_new(values: dict[str, Any], overwrite: bool, on_event: Any) -> dict[str, Any]:
    """:func:`clipret.train` with the command line's settings (with --overwrite it replaces the old run first)."""
    from clipret.api import train

    settings = dict(values)
    return train(settings.pop("root"), out=settings.pop("out"), overwrite=overwrite, progress=on_event, **settings)


def _run(start: Any) -> None:
    """Run ``start(on_event)`` with progress on rank 0; every rank leaves on an error, non-zero, and
    on SIGINT/SIGTERM (after a checkpoint, see :mod:`clipret.training.stop`) with 130/143."""
    from clipret import _fault, runtime
    from clipret.cli._train_progress import run_with_progress
    from clipret.errors import ClipretError
    from clipret.parallel.groups import PeerError, exit_rank, lost_peer
    from clipret.training.stop import TrainingStopped

    try:
        run_with_progress(start)
    except TrainingStopped as stop:
        if runtime.is_main():
            _console.info(f"stopped by {stop.name} after step {stop.step} of {stop.total}; checkpoint written to "
                          f"{stop.run}; continue with: {stop.resume_command()}")
        _fault.maybe_slow_exit()
        if runtime.world_size() > 1:  # a normal interpreter exit after a group torn down mid-epoch can abort
            exit_rank(stop.exit_code)  # in gloo's C++ destructors (signal 6); the checkpoint is already renamed
        raise typer.Exit(stop.exit_code) from None
    except PeerError:  # rank 0 raised the same error and prints it
        _console.leave_group(2)
    except ClipretError as exc:
        if runtime.world_size() > 1 and not runtime.is_main():
            raise ClipretError(f"rank {runtime.rank()}: {exc}") from None
        raise
    except RuntimeError as exc:
        if runtime.world_size() > 1 and lost_peer(exc):
            _console.leave_group(1, f"rank {runtime.rank()} lost contact with another rank, which failed or was stopped "
                                 "(its error is above)")
        raise


train_command.__doc__ = _HELP
