"""A model folder (``config.json`` + ``model.safetensors``), weight files and training checkpoints.

Weights are read with safetensors, or ``torch.load(weights_only=True)``: a
pickle that carries code is refused. torch is imported only inside the
functions that need it.

How the folder's two files stay a pair (a crash leaves the old pair or the new one)
---------------------------------------------------------------------------------
``config.json`` records ``weights_sha256``, the sha256 of ``model.safetensors``' bytes, and a
fingerprint made from the config and that digest. :func:`save_model_folder`

1. writes the weights to a temporary file and hashes it;
2. writes the new config to ``.config.json.pending``;
3. renames the weights over ``model.safetensors``;
4. renames the pending config over ``config.json``.

:func:`read_model_config` hashes the weights and returns the config they belong to:
``config.json``, or, after a crash between steps 3 and 4, the pending config, which it also
writes to ``config.json`` when the folder is writable (rolled forward). Weights that belong to
neither are a one-line error: a load never pairs new weights with the old fingerprint. The hash
costs a read of the file (about a second a GB), once per file per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipret import __version__, _fault
from clipret.artifacts.atomic import _fsync_dir, atomic_path, kept_mode, read_json, write_error, write_json
from clipret.errors import ClipretError, first_line

MODEL_FORMAT = "clipret.model/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PENDING_NAME = ".config.json.pending"
_WRITTEN = ("format", "clipret_version", "weights_sha256", "fingerprint")  # what save_model_folder sets itself
_digests: dict[tuple[int, int, int, int], str] = {}  # (dev, inode, size, mtime) of a weights file -> its sha256


def save_model_folder(folder: str | os.PathLike[str], state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` as a pair; return the fingerprint.

    The fingerprint (sha256 of the canonical config and the weights file,
    first 16 hex digits) is stored in config.json and copied into every
    embeddings manifest made with this model. See the module docstring for the steps.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    config = json.loads(json.dumps({k: v for k, v in config.items() if k not in _WRITTEN}))  # as it reads back
    with atomic_path(folder / WEIGHTS_NAME, size_hint=size) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        digest = _sha256(tmp)[1]
        meta = {"format": MODEL_FORMAT, "clipret_version": __version__, **config, "weights_sha256": digest,
                "fingerprint": fingerprint_of(config, digest)}
        write_json(folder / PENDING_NAME, meta)  # step 2
        os.chmod(folder / PENDING_NAME, kept_mode(folder / CONFIG_NAME))
    _commit(folder)  # step 3 happened as atomic_path renamed the weights
    return meta["fingerprint"]


def _commit(folder: Path) -> None:
    """Step 4: rename the pending config over ``config.json``."""
    final = folder / CONFIG_NAME
    _fault.maybe_kill("before-rename", final.name)
    try:
        os.replace(folder / PENDING_NAME, final)
    except OSError as exc:
        raise write_error(final, exc) from None
    _fsync_dir(folder)
    _fault.maybe_kill("after-rename", final.name)


def fingerprint_of(config: Mapping[str, Any], weights_digest: str) -> str:
    cfg = {k: v for k, v in config.items() if k not in _WRITTEN}
    blob = json.dumps(cfg, sort_keys=True).encode() + weights_digest.encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> tuple[tuple[int, int, int, int], str]:
    """(identity, sha256) of the file at ``path``, both of the one file read; hashed once per identity."""
    with open(path, "rb") as fh:
        key = _identity(os.fstat(fh.fileno()))
        if key not in _digests:
            h = hashlib.sha256()
            while block := fh.read(1 << 20):
                h.update(block)
            _digests[key] = h.hexdigest()
    return key, _digests[key]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The config of ``folder``'s weights: config.json, or the pending one an interrupted export left."""
    return _read_pair(Path(folder))[0]


def load_model_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, state dict) of ``folder``, both of the one weights file that was hashed."""
    folder = Path(folder)
    for _ in range(3):  # a training run may export a new pair between the hash and the load
        config, key = _read_pair(folder)
        state = load_weights_file(folder / WEIGHTS_NAME)
        with contextlib.suppress(OSError):
            if _identity(os.stat(folder / WEIGHTS_NAME)) == key:
                return config, state
    raise ClipretError(f"{folder / WEIGHTS_NAME} kept changing while it was read; rerun when no training run exports into {folder}")


def _read_pair(folder: Path) -> tuple[dict[str, Any], tuple[int, int, int, int]]:
    """(config, identity of the weights file it belongs to); see the module docstring."""
    if not folder.is_dir():
        raise ClipretError(f"model folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        raise ClipretError(f"{folder} has no {CONFIG_NAME}; pass a folder written by `clipret train`")
    config = read_json(folder / CONFIG_NAME, "model config")
    if not _is_model_config(config):
        raise ClipretError(f"{folder / CONFIG_NAME} is not a clipret model config")
    weights = folder / WEIGHTS_NAME
    try:
        key, digest = _sha256(weights)
    except FileNotFoundError:
        raise ClipretError(f"{folder} has no {WEIGHTS_NAME}; pass a folder written by `clipret train`") from None
    except OSError as exc:
        raise ClipretError(f"cannot read {weights}: {exc.strerror or first_line(exc)}") from None
    if _belongs(config, digest):
        return config, key
    pending = None
    with contextlib.suppress(ClipretError):  # none, or unreadable: only the mismatch is worth reporting
        pending = read_json(folder / PENDING_NAME, "pending model config")
    if _is_model_config(pending) and _belongs(pending, digest):
        with contextlib.suppress(ClipretError, OSError):  # roll forward; a read-only folder keeps the old file
            write_json(folder / CONFIG_NAME, pending, mkdir=False)
        return pending, key
    raise ClipretError(f"{weights} does not match {folder / CONFIG_NAME} (one of them was replaced, or is corrupt); "
                       "put back both files of one export, or retrain")


def _is_model_config(config: Any) -> bool:
    return isinstance(config, dict) and isinstance(config.get("model"), dict)


def _belongs(config: Mapping[str, Any], digest: str) -> bool:
    """Whether ``config`` was written with weights of sha256 ``digest`` (one without a fingerprint
    was not written by clipret and cannot tell: it is taken as it is)."""
    if config.get("weights_sha256", digest) != digest:
        return False
    return "fingerprint" not in config or config["fingerprint"] == fingerprint_of(config, digest)


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
