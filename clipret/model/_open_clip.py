"""The one place that knows how open_clip's image towers are built and shaped.

Everything here goes through open_clip's public surface: the ``CLIP`` class
(built from a model config dict, exactly as open_clip's JSON configs
describe it), the towers' own ``forward`` and their public attributes
(``proj``, ``attnpool``, ``output_tokens``, ``grid_size``). Two names come
from submodules rather than the package top level: ``resize_pos_embed``
(``open_clip.model``) and ``PreprocessCfg`` (``open_clip.transform``).
(The steps of ``open_clip.image_transform`` are recognised by
:func:`clipret.data.transforms.geometry_steps`.)
tests/test_model.py pins the open_clip versions this was checked against
(:data:`CHECKED_VERSIONS`); re-check this file before widening it.

Why ``CLIP(...)`` and not ``open_clip.create_model``: ``create_model`` takes a
registered model *name*, but a saved clipret model rebuilds from the config
dict it stores, and ``--model`` may be a config file. ``CLIP(**config)`` is
what ``create_model`` itself calls once it has the dict. We only need the
image tower, so the text tower is built from a one-layer stub config: that
keeps construction cheap and never asks Hugging Face for a text model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from clipret.errors import ClipretError

#: open_clip releases this module was checked against (a packaging specifier):
#: tests/test_model.py, test_tower.py and test_pooling.py pass on 2.29.0, 3.0.0 and 3.3.0.
#: (Before 2.29, open_clip's tag table lacks ``quick_gelu`` for the OpenAI weights.)
CHECKED_VERSIONS = ">=2.29,<3.4"

# A one-layer, width-8 text tower: CLIP's constructor always builds one; we drop it.
_STUB_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


def build_visual(cfg: dict[str, Any], quick_gelu: bool, image_size: int | None = None) -> nn.Module:
    """Construct the image tower of an open_clip config dict with random weights.

    Touches neither disk nor network (timm towers are built with
    ``timm_model_pretrained`` forced off).
    """
    import open_clip

    vision_cfg = dict(cfg["vision_cfg"])
    if image_size:
        vision_cfg["image_size"] = image_size
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    clip = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=_STUB_TEXT_CFG, quick_gelu=quick_gelu)
    return clip.visual


def tower_kind_of_config(cfg: dict[str, Any]) -> str:
    """``"vit"`` or ``"cnn"`` for a config clipret can fine-tune; ClipretError otherwise.

    Reads the config only (no model is built), so callers can validate
    ``--pool`` before any download.
    """
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision:
        raise ClipretError(f"timm image towers ({vision['timm_model_name']}) cannot be fine-tuned by clipret; "
                           "pick a ViT-* or RN* open_clip model")
    if isinstance(vision.get("layers"), (list, tuple)):
        return "cnn"
    if vision.get("attentional_pool"):
        raise ClipretError("towers with attentional pooling (CoCa) cannot be fine-tuned by clipret; pick a plain ViT")
    return "vit"


def has_cls_output(cfg: dict[str, Any]) -> bool:
    """True when the ViT's own pooled output is its CLS token (open_clip ``pool_type`` ``tok``)."""
    return cfg.get("vision_cfg", {}).get("pool_type", "tok") == "tok"


def strip_to_tokens(visual: nn.Module) -> tuple[str, int, tuple[str, ...]]:
    """Drop the tower's CLIP projection / attention pool, in place.

    Afterwards ``visual(x)`` returns token features (see :func:`token_features`).
    Returns ``(kind, width C, names of the dropped parameters / submodules)``.
    Raises ValueError for a tower that has no token output clipret can pool.
    """
    name = type(visual).__name__
    if name == "VisionTransformer":
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("towers with attentional pooling (CoCa) are not supported; pick a plain ViT")
        visual.proj = None  # forward skips the projection when it is None
        visual.output_tokens = True  # forward returns (pooled, patch tokens)
        return "vit", int(visual.class_embedding.shape[0]), ("proj",)
    if name == "ModifiedResNet":
        width = int(visual.attnpool.c_proj.in_features)
        visual.attnpool = nn.Identity()  # forward returns the layer4 map
        return "cnn", width, ("attnpool",)
    raise ValueError(f"image tower {name} is not supported for fine-tuning; use a ViT or RN model")


def token_features(visual: nn.Module, kind: str, x: Any) -> tuple[Any, Any]:
    """Run a stripped tower: (B, 3, H, W) -> (pooled (B, C) or None, tokens (B, N, C)).

    ViT: open_clip's forward with ``output_tokens``: after the transformer,
    ``ln_post`` is applied to every token, then the CLS token is split from
    the N patch tokens. Towers with ``final_ln_after_pool`` (CLIPA) apply
    ``ln_post`` to the pooled vector only and return the tokens before it;
    here ``ln_post`` is applied to those tokens too, so every tower's tokens
    are normalised and ``ln_post`` trains whatever the pooling. CNN: the
    layer4 map, (B, C, h, w) flattened to (B, h*w, C); there is no pooled output.
    """
    if kind == "cnn":
        return None, visual(x).flatten(2).transpose(1, 2)
    pooled, tokens = visual(x)
    if getattr(visual, "final_ln_after_pool", False):
        tokens = visual.ln_post(tokens)  # LayerNorm is per token: the same as ln_post before the split
    return pooled, tokens


def resize_pos_embed(state: dict[str, Any], visual: nn.Module) -> None:
    """Resize ``state['visual.positional_embedding']`` in place to ``visual``'s grid.

    The CLS row is kept; the (g, g) grid is resampled bicubically (with
    antialiasing) to the tower's grid. No-op for towers without a grid.
    """
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed as _resize

    _resize(state, SimpleNamespace(visual=visual))


def preprocess_defaults() -> dict[str, Any]:
    """open_clip's default preprocessing settings (size, mean, std, interpolation, resize_mode, ...)."""
    from open_clip.transform import PreprocessCfg

    return asdict(PreprocessCfg())
