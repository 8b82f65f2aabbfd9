"""Resolve an open_clip backbone: its config, its weights and its preprocessing.

This is the only module that may touch the network, and only through
:func:`fetch_weights` (open_clip's own downloader). Building a tower from a
config never does.

``--model`` is an open_clip model name (``ViT-L-14``) or a path to an
open_clip-format config JSON. ``--pretrained`` is a tag (``openai``), a local
weights file (.safetensors, or .pt/.bin read with ``weights_only=True``), or
``none``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from clipret.config import NO_WEIGHTS  # --pretrained values that mean random init
from clipret.errors import ClipretError
from clipret.model import _open_clip


def clip_config_for(model: str) -> tuple[str, dict[str, Any]]:
    """Return (name, open_clip config dict) for a model name or config JSON path."""
    import open_clip

    path = Path(model)
    if model.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ClipretError(f"model config file not found: {model}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ClipretError(f"{model} is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "embed_dim" not in cfg:
            raise ClipretError(f"{model} is not an open_clip model config (needs 'embed_dim' and 'vision_cfg')")
        return path.stem, cfg
    if "/" in model or os.sep in model:
        raise ClipretError(f"{model} not found: pass a run folder written by `clipret train`, an open_clip config JSON, "
                           "or an open_clip model name such as ViT-B-32")
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        close = [m for m in open_clip.list_models() if model.lower().replace("/", "-") in m.lower()][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else "; see `python -c 'import open_clip; print(open_clip.list_models())'`"
        raise ClipretError(f"unknown open_clip model {model!r}{hint}")
    return model, cfg


def default_tag(name: str) -> str:
    """The usual pretrained tag for a model: ``openai`` if it has one, else its first tag, else none."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if "openai" in tags:
        return "openai"
    return tags[0] if tags else "none"


def tag_config(name: str, pretrained: str) -> dict[str, Any]:
    """open_clip's pretrained config for ``(name, tag)``, or {} for files and ``none``."""
    import open_clip

    if pretrained.lower() in NO_WEIGHTS or Path(pretrained).is_file():
        return {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ClipretError(
            f"--pretrained {pretrained!r} is neither a file nor a known tag for {name}"
            + (f" (tags: {', '.join(tags)})" if tags else "")
            + "; pass a weights file or --pretrained none"
        )
    return dict(cfg)


def preprocess_for(cfg: dict[str, Any], tag_cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """Image size, mean, std, interpolation and resize mode, as open_clip defines them."""
    pre = _open_clip.preprocess_defaults()
    pre.update({k: v for k, v in cfg.get("preprocess_cfg", {}).items() if k in pre})
    pre.update({k: v for k, v in tag_cfg.items() if k in pre})
    size = image_size or cfg["vision_cfg"].get("image_size", pre["size"])
    pre["size"] = int(size) if isinstance(size, (int, float)) else list(size)
    pre["mean"], pre["std"] = list(pre["mean"]), list(pre["std"])
    return pre


def fetch_weights(name: str, pretrained: str) -> Path | None:
    """Local path of the weights for ``pretrained``; downloads tags (cached by open_clip)."""
    if pretrained.lower() in NO_WEIGHTS:
        return None
    if Path(pretrained).is_file():
        return Path(pretrained)
    if pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) or os.sep in pretrained:
        raise ClipretError(f"weights file not found: {pretrained}")
    import open_clip

    cfg = tag_config(name, pretrained)
    offline_hint = "offline, pass a local weights file (--pretrained PATH.safetensors) or --pretrained none"
    if not _cached(cfg) and not _hub_resolves():
        raise ClipretError(f"could not download pretrained weights '{pretrained}' for {name} (no network); {offline_hint}")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry chatter would bury our one-line error
    try:
        target = open_clip.download_pretrained(cfg)
    except Exception as exc:  # network errors come in many types
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ClipretError(f"could not download pretrained weights '{pretrained}' for {name} ({reason}); {offline_hint}") from None
    finally:
        hub_logger.setLevel(level)
    if not target:
        raise ClipretError(f"open_clip has no download for {name}:{pretrained}; pass a local weights file")
    return Path(target)


def build_visual(cfg: dict[str, Any], quick_gelu: bool, image_size: int | None = None) -> Any:
    """Construct the image tower from an open_clip config; never touches disk or network."""
    return _open_clip.build_visual(cfg, quick_gelu, image_size)


def load_visual_weights(visual: Any, state: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Load an open_clip CLIP state dict (``visual.*`` keys) or a bare tower state dict.

    A position embedding for another grid (``--image-size`` differing from
    the weights') is resized to the tower's grid. Tower parameters and
    submodules named in ``skip`` (the CLIP head a :class:`TokenTower` dropped)
    are ignored.
    """
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {f"visual.{k}": v for k, v in state.items()}
    _open_clip.resize_pos_embed(state, visual)
    tower_state = {k.removeprefix("visual."): v for k, v in state.items()}
    tower_state = {k: v for k, v in tower_state.items() if not any(k == n or k.startswith(n + ".") for n in skip)}
    try:
        missing, unexpected = visual.load_state_dict(tower_state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists every one, over many lines
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise ClipretError(f"weights do not fit this model ({first[:200]}); check that --model matches the weights") from None
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:4])
        raise ClipretError(
            f"weights do not fit this model ({len(missing)} missing, {len(unexpected)} unexpected keys: {shown}); "
            "check that --model matches the weights"
        )


def _cached(tag_cfg: dict[str, Any]) -> bool:
    """True when the tag's weights are already in the Hugging Face cache (no network needed)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _hub_resolves() -> bool:
    """A cheap offline check: can the weights host's name be resolved at all?

    Skipped (assumed online) behind a proxy or a custom endpoint, where DNS
    says nothing useful. Without it, an offline download retries for about
    a minute before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in {"", "0"}:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")):
        return True
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True
