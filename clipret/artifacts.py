"""Every file format clipret reads or writes, in one place.

* embeddings: ``x.npy`` (N, D) float32, L2-normalised rows, plus ``x.json``
  (the manifest: ids, dim, model fingerprint, flags, skipped images);
* results: ``results.json``, a list of ``{"filename", "samples", "scores"}``;
* a model folder: ``config.json`` + ``model.safetensors``;
* a training checkpoint: one file read back with ``torch.load(weights_only=True)``.

All writes are atomic (see :mod:`clipret.atomic_io`): a process killed at
any moment leaves either the old file or the complete new one.

torch is imported only inside the functions that need it, so ``query`` and
``evaluate`` on .npy files never pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret import __version__
from clipret.atomic_io import atomic_open, atomic_path, read_json, remove_stale_temps, sha256_file, sha256_text, write_json
from clipret.errors import ClipretError

__all__ = [
    "Embeddings", "save_embeddings", "load_embeddings", "manifest_path", "save_results", "load_results",
    "save_model_folder", "read_model_config", "load_weights_file", "fingerprint_of", "save_checkpoint",
    "load_checkpoint", "atomic_open", "atomic_path", "read_json", "write_json", "remove_stale_temps",
    "sha256_file", "sha256_text",
]

EMBEDDINGS_FORMAT = "clipret.embeddings/1"
MODEL_FORMAT = "clipret.model/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# --------------------------------------------------------------------------- embeddings
def manifest_path(npy_path: str | os.PathLike[str]) -> Path:
    """``gallery.npy`` -> ``gallery.json``."""
    return Path(npy_path).with_suffix(".json")


@dataclass
class Embeddings:
    """An (N, D) float32 matrix and what is known about it.

    ``vectors`` may be a read-only memory map for large files. ``ids`` has one
    entry per row. Optional manifest fields are ``None`` when the sidecar did
    not carry them (embeddings made by other tools), which switches off the
    checks that need them.
    """

    vectors: np.ndarray
    ids: list[str]
    fingerprint: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


def save_embeddings(
    path: str | os.PathLike[str],
    vectors: np.ndarray,
    ids: Sequence[str],
    *,
    fingerprint: str | None,
    flags: Mapping[str, Any] | None = None,
    skipped: Sequence[Mapping[str, str]] = (),
) -> Path:
    """Write ``path`` (.npy, (N, D) float32) and its manifest, both atomically.

    The manifest is written last, so a reader that finds a manifest also finds
    the matching array.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ClipretError(f"embeddings must be written to a .npy file, got {path}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"vectors {vectors.shape} do not match {len(ids)} ids")
    with atomic_open(path, "wb") as fh:
        np.save(fh, vectors, allow_pickle=False)
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "clipret_version": __version__,
        "count": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "dtype": "float32",
        "normalized": True,
        "model_fingerprint": fingerprint,
        "flags": dict(flags or {}),
        "ids": list(ids),
        "skipped": [dict(s) for s in skipped],
    }
    write_json(manifest_path(path), manifest)
    return path


def load_embeddings(path: str | os.PathLike[str], *, mmap: bool = True, check_finite: bool = True) -> Embeddings:
    """Read an embeddings .npy and its sidecar manifest, if there is one.

    Without a sidecar, the row numbers ("0", "1", ...) become the ids. Raises
    :class:`ClipretError` for a missing file, a wrong shape, a row count that
    disagrees with the manifest, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"embeddings file not found: {path}")
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ClipretError(f"cannot read {path} as a .npy array ({exc})") from None
    if vectors.ndim != 2:
        raise ClipretError(f"{path} holds an array of shape {vectors.shape}; expected (N, D)")
    if vectors.dtype != np.float32:
        vectors = np.asarray(vectors, dtype=np.float32)
    if check_finite:
        _check_finite(vectors, path)

    side = manifest_path(path)
    if not side.is_file():
        return Embeddings(vectors, [str(i) for i in range(vectors.shape[0])], path=path)
    meta = read_json(side, "manifest")
    if not isinstance(meta, dict) or not isinstance(meta.get("ids"), list):
        raise ClipretError(f"manifest {side} has no 'ids' list; it must hold at least {{\"ids\": [...]}}")
    ids = [str(i) for i in meta["ids"]]
    if len(ids) != vectors.shape[0]:
        raise ClipretError(
            f"{path} has {vectors.shape[0]} rows but its manifest {side.name} lists {len(ids)} ids; "
            "re-run `clipret embed` to regenerate both"
        )
    if "dim" in meta and int(meta["dim"]) != vectors.shape[1]:
        raise ClipretError(f"{path} has dim {vectors.shape[1]} but its manifest says {meta['dim']}")
    return Embeddings(
        vectors,
        ids,
        fingerprint=meta.get("model_fingerprint"),
        flags=dict(meta.get("flags") or {}),
        skipped=list(meta.get("skipped") or []),
        path=path,
    )


def _check_finite(vectors: np.ndarray, path: Path, chunk: int = 65536) -> None:
    for start in range(0, vectors.shape[0], chunk):
        block = np.asarray(vectors[start : start + chunk])
        if not np.isfinite(block).all():
            row = start + int(np.argwhere(~np.isfinite(block))[0, 0])
            raise ClipretError(f"{path} contains a non-finite value (row {row}); re-embed these images")


# --------------------------------------------------------------------------- results
def save_results(path: str | os.PathLike[str], query_ids: Sequence[str], samples: Sequence[Sequence[str]], scores: np.ndarray) -> None:
    """Write results.json: ``[{"filename": qid, "samples": [gid, ...], "scores": [...]}, ...]``.

    ``scores`` is (Q, k) float; ``samples`` holds Q lists of gallery ids, best first.
    """
    records = [
        {"filename": qid, "samples": list(row_ids), "scores": [round(float(s), 6) for s in row_scores]}
        for qid, row_ids, row_scores in zip(query_ids, samples, scores)
    ]
    write_json(path, records)


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read results.json (ours, or the seed's format without scores)."""
    data = read_json(path, "results file")
    ok = isinstance(data, list) and all(isinstance(r, dict) and "filename" in r and isinstance(r.get("samples"), list) for r in data)
    if not ok:
        raise ClipretError(f"{path} is not a results file: expected a list of {{'filename', 'samples'}} objects")
    return data


# --------------------------------------------------------------------------- model folder
def save_model_folder(folder: str | os.PathLike[str], state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Write ``model.safetensors`` then ``config.json`` into ``folder``; return the fingerprint.

    The fingerprint (sha256 of the canonical config and the weights file,
    first 16 hex digits) is stored in config.json and copied into every
    embeddings manifest made with this model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
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
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClipretError(
            f"refusing to load {path}: it is not a plain weights file ({msg}); "
            "convert it to .safetensors, or pass --pretrained none"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipretError(f"{path} does not hold a state dict of tensors")
    return obj


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a training checkpoint atomically (tensors, numbers, strings, lists, dicts only)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"no checkpoint at {path}; nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClipretError(f"checkpoint {path} is unreadable ({str(exc).splitlines()[0]}); delete it to start over") from None
