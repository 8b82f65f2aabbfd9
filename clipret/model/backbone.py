"""Resolve an open_clip backbone: its config, its weights and its preprocessing.

This is the only module that may touch the network, and only through
:func:`fetch_weights` (open_clip's own downloader). Building a tower from a
config never does.

``--model`` is an open_clip model name (``ViT-L-14``) or a path to an
open_clip-format config JSON. ``--pretrained`` is a tag (``openai``), a local
weights file (.safetensors, or .pt/.bin read with ``weights_only=True``),
``TAG=PATH`` (a local file holding the weights of that tag), or ``none``.

A tag carries settings the weights were trained with: ``quick_gelu`` and the
preprocessing (mean, std, interpolation, resize mode). A local file takes
them from the tag it names, or, given alone, from the model's tags where
they all agree (:func:`tag_config`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from clipret.config import NO_WEIGHTS  # --pretrained values that mean random init
from clipret.errors import ClipretError
from clipret.model import _open_clip
from clipret.model.bundled import bundled_config, bundled_names

#: ``TAG=PATH``: the tag a local weights file holds (tags are letters, digits, ``_``, ``-``, ``.``).
_TAGGED = re.compile(r"^(?P<tag>[A-Za-z0-9_.-]+)=(?P<path>.+)$")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def clip_config_for(model: str) -> tuple[str, dict[str, Any]]:
    """Return (name, open_clip config dict) for a model name or config JSON path."""
    import open_clip

    path = Path(model)
    if not path.is_file() and (shipped := bundled_config(model)) is not None:
        if model.endswith(".json") or open_clip.get_model_config(model) is None:
            path, model = shipped, str(shipped)
    if model.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ClipretError(f"model config file not found: {model} (configs bundled with clipret, usable by "
                               f"name from anywhere: {', '.join(bundled_names())})")
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


def split_tagged(pretrained: str) -> tuple[str | None, str]:
    """``"TAG=PATH"`` -> ``(TAG, PATH)``; anything else (a tag, a file, none) -> ``(None, pretrained)``.

    An existing file whose name holds ``=`` is a file, not ``TAG=PATH``.
    """
    match = _TAGGED.match(pretrained)
    if match is None or Path(pretrained).is_file():
        return None, pretrained
    return match["tag"], match["path"]


def local_weights_path(pretrained: str) -> Path | None:
    """The local file ``pretrained`` names (``PATH`` or ``TAG=PATH``), or None for a tag or ``none``.

    Raises ClipretError when it names a file that does not exist.
    """
    if pretrained.lower() in NO_WEIGHTS:
        return None
    tag, path = split_tagged(pretrained)
    if Path(path).is_file():
        return Path(path)
    if tag is not None or path.endswith(_WEIGHT_SUFFIXES) or os.sep in path or "/" in path:
        raise ClipretError(f"weights file not found: {path}")
    return None


def tag_config(name: str, pretrained: str) -> dict[str, Any]:
    """The settings of open_clip's pretrained table that hold for ``pretrained`` weights of ``name``.

    * a tag: its table entry (download source included);
    * ``TAG=PATH``: that tag's settings (``quick_gelu``, mean, std, ...);
    * a file alone: the settings all of the model's tags agree on ({} for a model with no tags);
      ClipretError (one line, listing the tags) where they disagree;
    * ``none``: {}.
    """
    import open_clip

    if pretrained.lower() in NO_WEIGHTS:
        return {}
    tag, path = split_tagged(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag is not None:
        settings = _settings(_known_tag(name, tag, tags, path))
        local_weights_path(pretrained)  # a missing file is reported now, before any image is read
        return settings
    if local_weights_path(pretrained) is not None:
        return _agreed_settings(name, tags, pretrained)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise ClipretError(
            f"--pretrained {pretrained!r} is neither a file nor a known tag for {name}"
            + (f" (tags: {', '.join(tags)})" if tags else "")
            + "; pass a weights file or --pretrained none"
        )
    return dict(cfg)


def _known_tag(name: str, tag: str, tags: list[str], path: str) -> dict[str, Any]:
    """open_clip's table entry for ``(name, tag)``; ClipretError naming the choices if there is none."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg:
        return dict(cfg)
    if not tags:
        raise ClipretError(f"--pretrained {tag}={path}: {name} has no open_clip tags; pass the file alone (--pretrained {path})")
    raise ClipretError(f"--pretrained {tag}={path}: {tag!r} is not a tag of {name}; use one of: {', '.join(tags)}")


def _agreed_settings(name: str, tags: list[str], path: str) -> dict[str, Any]:
    """The settings of ``name``'s tags, for a weights file that names none; ClipretError if they differ."""
    import open_clip

    per_tag = [_settings(dict(open_clip.get_pretrained_cfg(name, t))) for t in tags]
    if not per_tag:
        return {}
    filled = [_filled(s) for s in per_tag]
    differ = [k for k in filled[0] if any(f[k] != filled[0][k] for f in filled[1:])]
    if differ:
        raise ClipretError(f"{name}'s tags disagree on {'/'.join(differ)}; name the tag your file holds: "
                           f"--pretrained TAG={path} (tags: {', '.join(tags)})")
    return per_tag[0]


def _settings(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a tag's table entry that changes the network or its inputs (no download source)."""
    keys = {"quick_gelu", *_open_clip.preprocess_defaults()}
    return {k: v for k, v in tag_cfg.items() if k in keys}


def _filled(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with open_clip's defaults for what a tag leaves out, tuples as lists (comparable)."""
    full = {"quick_gelu": False, **_open_clip.preprocess_defaults(), **settings}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


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
    local = local_weights_path(pretrained)
    if local is not None:
        return local
    import open_clip

    cfg = tag_config(name, pretrained)
    offline_hint = (f"offline, pass a local weights file with its tag (--pretrained {pretrained}=PATH.safetensors) "
                    "or --pretrained none")
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
        raise ClipretError(f"open_clip has no download for {name}:{pretrained}; "
                           f"pass a local weights file with its tag (--pretrained {pretrained}=PATH.safetensors)")
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
