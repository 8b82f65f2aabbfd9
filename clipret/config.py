"""Settings for training, as one dataclass; TOML in, JSON out.

Every ``clipret train`` option can come from a TOML file (``--config
train.toml``), whose keys are the options' long names with dashes or
underscores (``images-per-class``, ``images_per_class`` or ``k``); flags given
on the command line override the file. The switches that replace or continue
a run (``--overwrite``, ``--resume``) and ``--config`` itself are command-line only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from clipret.errors import ClipretError

__all__ = ["AMPS", "COMMAND_LINE_ONLY", "GEM_INPUTS", "LOSSES", "NO_WEIGHTS", "POOLS", "RESUME_OVERRIDABLE", "TrainConfig",
           "read_toml"]

# The valid values of the settings, torch-free: the CLI's choices, and what clipret.model and clipret.training check against.
AMPS = ("auto", "bf16", "fp16", "none")
#: ``--pool``: GeM over patch tokens / feature-map cells, the ViT's CLS token, or their mean.
POOLS = ("gem", "cls", "mean")
#: ``--gem-input``: how GeM makes signed ViT tokens non-negative (see clipret.model.pooling).
GEM_INPUTS = ("clamp", "softplus", "shift")
LONG_NAMES = {"p": "classes-per-batch", "k": "images-per-class"}  # settings whose flag is not their field name
NO_WEIGHTS = ("none", "", "random")  # --pretrained values that mean random init (clipret.model.backbone)
PRETRAINED_LLRD = 0.65  # layer-wise LR decay of a pretrained tower
LOSSES = ("circle", "multisimilarity", "arcface")  # clipret.training.losses.Objective
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# Settings a resumed run may change: where things are and how they run, not what is computed.
RESUME_OVERRIDABLE = ("root", "out", "workers", "device", "amp", "save_every", "grad_checkpointing", "channels_last",
                      "compile", "tf32")
# Never read from a settings file: they replace or continue a run (data lost or mixed), or name the file itself.
COMMAND_LINE_ONLY = ("overwrite", "resume", "config")


@dataclass
class TrainConfig:
    """Every setting of a training run: what ``clipret train`` builds from its options (and a TOML
    file), and what :func:`clipret.train` takes as keyword arguments. Fields are the options'
    names with underscores (``p`` and ``k`` are ``--classes-per-batch`` and ``--images-per-class``)."""

    root: str = ""
    out: str = "runs/clipret"
    # model
    model: str = "ViT-L-14"
    pretrained: str | None = None  # None: the model's usual tag
    pool: str = "gem"
    gem_input: str = "clamp"
    embed_dim: int = 512
    dropout: float = 0.1
    head_bn: bool = True
    image_size: int | None = None
    # loss, miner, sampler
    loss: str = "circle"
    circle_m: float = 0.4
    circle_gamma: float = 32.0
    miner_epsilon: float = 0.1
    mine_from_epoch: int = 5  # 1-based
    p: int = 32
    k: int = 4
    # optimiser and schedule
    epochs: int = 15
    lr: float = 4e-4
    weight_decay: float = 0.05
    llrd: float | None = None  # None: 0.65 when the tower starts from pretrained weights, 1.0 from random init
    head_lr_mult: float = 10.0
    warmup: float = 0.15
    grad_clip: float = 1.0
    # augmentation; None: chosen from the input size and the images (clipret.data.transforms.resolve_augmentation)
    aug_crop: bool | None = None
    aug_crop_scale: float = 0.5
    aug_flip: bool = True
    aug_color_jitter: float | None = None
    aug_grayscale: float | None = None
    aug_erasing: float | None = None
    # run
    amp: str = "auto"
    val_split: float = 0.1
    workers: int | None = None  # None: automatic (clipret.runtime.resolve_workers); results do not depend on it
    device: str = "auto"
    seed: int = 0
    save_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    exact_decode: bool = False  # False: large JPEGs decode at a reduced scale (clipret.data.decode.load_rgb)
    # speed (clipret.training.fast): how the steps run, not what they compute (beyond float rounding)
    grad_checkpointing: bool = False  # recompute ViT blocks in the backward (less memory, ~1/3 more compute)
    channels_last: bool = False  # NHWC memory layout for CNN towers
    compile: bool = False  # torch.compile the training forward (falls back to eager if compiling fails)
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA

    def resolved_llrd(self, pretrained: str) -> float:
        """``llrd``, or when unset: 0.65 for a tower with pretrained weights (``pretrained``, the
        model spec's source), 1.0 (no decay) for one at random init, which has nothing to protect."""
        if self.llrd is not None:
            return self.llrd
        return 1.0 if pretrained.lower() in NO_WEIGHTS else PRETRAINED_LLRD

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain dict (what a run's config.json records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The settings in ``d`` (keys that are not settings are ignored), defaults for the rest."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        """Raise a one-line :class:`ClipretError` for the first setting out of its range."""
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.p >= 2, "--classes-per-batch (--p) must be at least 2 (metric learning needs several classes per batch)"),
            (self.k >= 2, "--images-per-class (--k) must be at least 2 (each class needs a positive pair)"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.val_split < 1, "--val-split must be in [0, 1)"),
            (self.llrd is None or 0 < self.llrd <= 1, "--llrd must be in (0, 1]"),
            (0 <= self.warmup, "--warmup must be non-negative"),
            (self.mine_from_epoch >= 1, "--mine-from-epoch is 1-based and must be at least 1"),
            (self.embed_dim >= 1, "--embed-dim must be positive"),
            (self.workers is None or self.workers >= 0, "--workers must be non-negative"),
            (self.dropout >= 0 and self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.circle_m >= 0, "--circle-m must be non-negative"),
            (self.circle_gamma > 0, "--circle-gamma must be positive"),
            (self.miner_epsilon >= 0, "--miner-epsilon must be non-negative"),
            (self.grad_clip > 0, "--grad-clip must be positive"),
            (self.head_lr_mult > 0, "--head-lr-mult must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be non-negative"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be positive"),
            (self.save_every >= 0, "--save-every must be non-negative"),
            (self.seed >= 0, "--seed must be non-negative"),
            (self.pool in POOLS, f"unknown --pool {self.pool!r}; use {', '.join(POOLS)}"),
            (self.gem_input in GEM_INPUTS, f"unknown --gem-input {self.gem_input!r}; use {', '.join(GEM_INPUTS)}"),
            (self.loss in LOSSES, f"unknown --loss {self.loss!r}; use {', '.join(LOSSES)}"),
            (0 < self.aug_crop_scale <= 1, "--aug-crop-scale must be in (0, 1]"),
            (self.aug_color_jitter is None or self.aug_color_jitter >= 0, "--aug-color-jitter must be non-negative"),
            (self.aug_grayscale is None or 0 <= self.aug_grayscale <= 1, "--aug-grayscale must be in [0, 1]"),
            (self.aug_erasing is None or 0 <= self.aug_erasing <= 1, "--aug-erasing must be in [0, 1]"),
            (self.amp in AMPS, f"unknown --amp {self.amp!r}; use {', '.join(AMPS)}"),
            (bool(_DEVICE.match(self.device)), f"unknown --device {self.device!r}; use auto, cpu, cuda or cuda:N"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ClipretError(msg)


def read_toml(path: str | Path, keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a TOML settings file into {setting: value}.

    A ``[train]`` table is used if present, otherwise the top level. ``keys`` maps every key the
    file may use, in underscore form, to its setting (``clipret train`` passes each option's long
    names: ``images_per_class`` and ``k`` both give ``k``); a dash in a key counts as an underscore.
    Default: the :class:`TrainConfig` field names. Raises :class:`ClipretError`, in one line, for a
    key that is unknown, command-line only (:data:`COMMAND_LINE_ONLY`), or a second one for a setting.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipretError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClipretError(f"{path} is not valid TOML ({exc})") from None
    table = data.get("train", data)
    keys = keys if keys is not None else {n: n for n in [*(f.name for f in fields(TrainConfig)), *COMMAND_LINE_ONLY]}
    _refuse_keys(path, [str(k) for k in table], keys)
    return {keys[str(k).replace("-", "_")]: v for k, v in table.items()}


def _refuse_keys(path: Path, given: list[str], keys: Mapping[str, str]) -> None:
    """One-line errors for the keys of ``given`` (as written in the file) that :func:`read_toml` does not take."""
    setting = {k: keys.get(k.replace("-", "_")) for k in given}  # None: unknown
    only = [k for k in given if setting[k] in COMMAND_LINE_ONLY]
    if only:
        flags = ", ".join(f"--{setting[k]}" for k in only)
        raise ClipretError(f"{path}: {', '.join(only)} {'is' if len(only) == 1 else 'are'} command-line only (a settings "
                           f"file never replaces or continues a run); remove it from the file and pass {flags} on the command line")
    unknown = [k for k in given if setting[k] is None]
    if unknown:
        valid = sorted({k.replace("_", "-") for k, s in keys.items() if s not in COMMAND_LINE_ONLY})
        near = {k: difflib.get_close_matches(k.replace("_", "-"), valid, n=1) for k in unknown}
        named = ", ".join(k + (f" (did you mean {near[k][0]}?)" if near[k] else "") for k in unknown)
        listing = "" if all(near.values()) else f"; valid keys: {', '.join(valid)}"
        raise ClipretError(f"{path}: unknown setting(s) {named}{listing}")
    for name in dict.fromkeys(setting.values()):
        twice = [k for k in given if setting[k] == name]
        if len(twice) > 1:
            raise ClipretError(f"{path}: {' and '.join(twice)} set the same setting; keep one of them")
