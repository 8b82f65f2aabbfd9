"""A model folder (``config.json`` + ``model.safetensors``), weight files and training checkpoints.

Weights are read with safetensors, or ``torch.load(weights_only=True)``: a
pickle that carries code is refused. torch is imported only inside the
functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipret import __version__
from clipret.artifacts.atomic import atomic_path, read_json, sha256_file, write_json
from clipret.errors import ClipretError, first_line

MODEL_FORMAT = "clipret.model/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model_folder(folder: str | os.PathLike[str], state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Write ``model.safetensors`` then ``config.json`` into ``folder``; return the fingerprint.

    The fingerprint (sha256 of the canonical config and the weights file,
    first 16 hex digits) is stored in config.json and copied into every
    embeddings manifest made with this model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(folder / WEIGHTS_NAME, size_hint=size) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {k: v for k, v in config.items() if k != "fingerprint"}
    fingerprint = fingerprint_of(config, sha256_file(folder / WEIGHTS_NAME))
    write_json(folder / CONFIG_NAME, {"format": MODEL_FORMAT, "clipret_version": __version__, **config, "fingerprint": fingerprint})
    return fingerprint


def fingerprint_of(config: Mapping[str, Any], weights_digest: str) -> str:
    cfg = {k: v for k, v in config.items() if k not in {"fingerprint", "clipret_version", "format"}}
    blob = json.dumps(cfg, sort_keys=True).encode() + weights_digest.encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipretError(f"model folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise ClipretError(f"{folder} has no {CONFIG_NAME}; pass a folder written by `clipret train`")
    config = read_json(folder / CONFIG_NAME, "model config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ClipretError(f"{folder / CONFIG_NAME} is not a clipret model config")
    return config


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a weights file safely: safetensors, or ``torch.load(weights_only=True)``.

    A pickle that carries code is refused; its code never runs.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClipretError(f"{path} is not a readable safetensors file ({exc}); re-export or re-download it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError variants
        msg = first_line(exc)
        raise ClipretError(
            f"refusing to load {path}: it is not a plain weights file ({msg}); "
            "convert it to .safetensors, or pass --pretrained none"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipretError(f"{path} does not hold a state dict of tensors")
    return obj


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a training checkpoint atomically (tensors, numbers, strings, lists, dicts only)."""
    import torch

    with atomic_path(path, size_hint=_tensor_bytes(state)) as tmp:
        torch.save(dict(state), tmp)


def _tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors inside nested dicts/lists (the size of a checkpoint, roughly)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"no checkpoint at {path}; nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = first_line(exc)
        raise ClipretError(f"checkpoint {path} is unreadable ({reason}); delete it to start over") from None
