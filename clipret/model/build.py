"""Build, save and load encoders. Build first, load weights second.

A :class:`ModelSpec` holds everything needed to rebuild a model and its
preprocessing: the open_clip config dict itself (not just its name), so a
saved folder rebuilds without the original config file or network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipret import artifacts
from clipret.config import GEM_INPUTS, POOLS
from clipret.errors import ClipretError
from clipret.model import _open_clip, backbone, warm_start
from clipret.model.net import ClipImageEncoder, RetrievalNet
from clipret.model.tower import TokenTower

#: ``ModelSpec.pool`` values: the trainable pools, and ``clip`` (CLIP's own embedding, zero-shot).
SPEC_POOLS = (*POOLS, "clip")


@dataclass
class ModelSpec:
    """How to rebuild an encoder. ``pool == "clip"`` means CLIP's own embedding, no head.

    ``quick_gelu`` and ``preprocess`` are the settings the weights need, resolved once from the
    config and the ``pretrained`` tag (see :func:`clipret.model.backbone.tag_config`); a saved
    run records them in its config.json and rebuilds from them.
    """

    backbone: str
    clip_config: dict[str, Any]
    quick_gelu: bool = False
    pool: str = "gem"
    gem_input: str = "clamp"
    embed_dim: int = 512
    dropout: float = 0.1
    head_bn: bool = True  # BatchNorm1d in the head (runs saved before the switch have it)
    image_size: int | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def make_spec(
    model: str,
    pretrained: str | None = None,
    *,
    pool: str = "gem",
    gem_input: str = "clamp",
    embed_dim: int = 512,
    dropout: float = 0.1,
    head_bn: bool = True,
    image_size: int | None = None,
) -> ModelSpec:
    """Resolve ``--model``/``--pretrained`` into a spec (no weights are read yet).

    Reads only the open_clip config (and, for a tag, open_clip's tag table),
    so callers can validate settings before any image check or download.
    Raises ClipretError for an unknown model, tag, ``pool`` or ``gem_input``,
    and for a pool the tower cannot give (``cls`` on a ResNet).
    """
    check_pool(pool, gem_input)
    name, cfg = backbone.clip_config_for(model)
    check_pool_fits_tower(pool, cfg, name)
    run = warm_start.run_source(pretrained)
    if run is not None:  # a clipret run: its tower (and head, where it fits) start the new one
        saved = warm_start.run_model_spec(run)
        if cfg.get("vision_cfg") != saved["clip_config"].get("vision_cfg"):
            raise ClipretError(f"--pretrained {run} was trained from {saved['backbone']}, not {name}; "
                               f"pass --model {saved['backbone']}")
        size = image_size if image_size is not None else saved.get("image_size")
        if size != saved.get("image_size"):
            raise ClipretError(f"--pretrained {run} was trained at --image-size {saved.get('image_size') or 'default'}; "
                               "starting from a run at another input size is not supported")
        return ModelSpec(backbone=name, clip_config=cfg, quick_gelu=bool(saved.get("quick_gelu")), pool=pool,
                         gem_input=gem_input, embed_dim=embed_dim, dropout=dropout, head_bn=head_bn, image_size=size,
                         preprocess=dict(saved["preprocess"]), pretrained=str(run))
    if pretrained is None:
        pretrained = backbone.default_tag(name)
    tag_cfg = backbone.tag_config(name, pretrained)
    quick_gelu = bool(cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    return ModelSpec(
        backbone=name,
        clip_config=cfg,
        quick_gelu=quick_gelu,
        pool=pool,
        gem_input=gem_input,
        embed_dim=embed_dim,
        dropout=dropout,
        head_bn=head_bn,
        image_size=image_size,
        preprocess=backbone.preprocess_for(cfg, tag_cfg, image_size),
        pretrained=pretrained,
    )


def check_pool(pool: str, gem_input: str = "clamp") -> None:
    """ClipretError (one line) unless ``pool`` and ``gem_input`` are known values."""
    if pool not in SPEC_POOLS:
        raise ClipretError(f"unknown --pool {pool!r}; choose one of {', '.join(POOLS)}")
    if gem_input not in GEM_INPUTS:
        raise ClipretError(f"unknown --gem-input {gem_input!r}; choose one of {', '.join(GEM_INPUTS)}")


def check_pool_fits_tower(pool: str, cfg: dict[str, Any], name: str = "this model") -> None:
    """ClipretError (one line) if the config's image tower cannot be pooled with ``pool``."""
    if pool == "clip":
        return  # CLIP's own embedding: every tower open_clip builds has one
    kind = _open_clip.tower_kind_of_config(cfg)
    if pool == "cls" and kind != "vit":
        raise ClipretError(f"--pool cls needs a ViT backbone, and {name} is a ResNet; use --pool gem or --pool mean")
    if pool == "cls" and not _open_clip.has_cls_output(cfg):
        raise ClipretError(f"{name} pools its tokens without a CLS token; use --pool gem or --pool mean")


def build_encoder(spec: ModelSpec) -> nn.Module:
    """Construct the encoder with random weights. Touches neither disk nor network."""
    return _assemble(spec, backbone.build_visual(spec.clip_config, spec.quick_gelu, spec.image_size))


def create_encoder(spec: ModelSpec, notes: list[str] | None = None) -> nn.Module:
    """Build the encoder and load the backbone's pretrained weights (download if a tag), or a
    clipret run's weights (:mod:`clipret.model.warm_start`; what starts fresh is appended to ``notes``)."""
    run = warm_start.run_source(spec.pretrained) if spec.pool != "clip" else None
    if run is not None:
        encoder = build_encoder(spec)
        (notes if notes is not None else []).extend(warm_start.load_run_weights(encoder, run))
        return encoder
    path = backbone.fetch_weights(spec.backbone, spec.pretrained)
    visual = backbone.build_visual(spec.clip_config, spec.quick_gelu, spec.image_size)
    encoder = _assemble(spec, visual)
    if path is not None:
        skip = encoder.tower.dropped if isinstance(encoder, RetrievalNet) else ()
        backbone.load_visual_weights(visual, artifacts.load_weights_file(path), skip=skip)
    return encoder


def _assemble(spec: ModelSpec, visual: nn.Module) -> nn.Module:
    """The encoder ``spec`` describes, around an already built image tower."""
    if spec.pool == "clip":
        return ClipImageEncoder(visual)
    return RetrievalNet(TokenTower(visual), spec.pool, spec.embed_dim, spec.dropout, spec.gem_input, spec.head_bn)


def save_model(folder: str | Path, encoder: nn.Module, spec: ModelSpec) -> str:
    """Write ``config.json`` + ``model.safetensors``; return the model fingerprint."""
    return artifacts.save_model_folder(folder, encoder.state_dict(), {"model": spec.to_dict()})


def load_model(folder: str | Path) -> tuple[nn.Module, ModelSpec, str]:
    """Rebuild a saved model offline; returns (encoder in eval mode, spec, fingerprint)."""
    folder = Path(folder)
    config, state = artifacts.load_model_folder(folder)  # one pair: the config these weights belong to
    spec = ModelSpec.from_dict(config["model"])
    encoder = build_encoder(spec)
    weights = folder / artifacts.WEIGHTS_NAME
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ClipretError(f"{weights} does not match {folder / artifacts.CONFIG_NAME} ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return encoder.eval(), spec, str(config.get("fingerprint") or "")


def open_encoder(model: str, pretrained: str | None = None) -> tuple[nn.Module, ModelSpec, str]:
    """What ``embed``/``query`` use: a trained folder, or an open_clip model for zero-shot.

    For an open_clip name or config, the encoder is CLIP's own image embedding
    (no head) with the given pretrained weights.
    """
    if Path(model).is_dir():
        return load_model(model)
    spec = make_spec(model, pretrained, pool="clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # with --pretrained none, the same random weights every time
        encoder = create_encoder(spec).eval()
    return encoder, spec, zero_shot_fingerprint(spec)


def zero_shot_fingerprint(spec: ModelSpec) -> str:
    src = spec.pretrained
    local = backbone.local_weights_path(src)  # PATH or TAG=PATH: the file's content, not its name
    if local is not None:
        src = "sha256:" + artifacts.sha256_file(local)
    return artifacts.fingerprint_of({"model": spec.to_dict(), "weights_source": src}, "")

