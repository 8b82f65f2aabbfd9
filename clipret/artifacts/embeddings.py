"""Embeddings: ``x.npy`` (N, D) float32 L2-normalised rows, plus the ``x.json`` manifest.

The manifest holds the ids (one per row), dim, the model fingerprint, flags,
the skipped images, the folder the ids are relative to (``root``), and two
digests of the array: a cheap sampled one checked on every load
(:func:`array_digest`) and a hash of every byte (:func:`content_hash`) that
keys caches built from the array. Both files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret import __version__
from clipret.artifacts.atomic import atomic_open, read_json, sha256_text, write_json
from clipret.errors import ClipretError

EMBEDDINGS_FORMAT = "clipret.embeddings/1"
DIGEST_ROWS = 64  # rows sampled by array_digest
_HASH_CHUNK_BYTES = 16 * 2**20  # rows hashed at a time by content_hash


def array_digest(vectors: np.ndarray) -> str:
    """A cheap content digest of an (N, D) array: its shape and dtype plus 64 evenly spaced rows.

    Reads at most 64 rows, so checking a memory-mapped million-row file costs
    milliseconds. It ties a manifest to the array it was written with: a
    re-embed with another model changes every row, so an array swapped in
    beside an old manifest is caught. (It is not a cryptographic seal over
    every byte; the row count and dim are checked separately.)
    """
    h = hashlib.sha256(f"{vectors.shape}|{vectors.dtype.str}|".encode())
    n = vectors.shape[0]
    if n:
        rows = np.unique(np.linspace(0, n - 1, num=min(n, DIGEST_ROWS)).round().astype(np.int64))
        h.update(np.ascontiguousarray(vectors[rows]).tobytes())
    return h.hexdigest()[:32]


def content_hash(vectors: np.ndarray) -> str:
    """blake2b of an (N, D) array's shape, dtype and every byte of its rows, in C order.

    Unlike :func:`array_digest` it sees a change to any single value, so it
    keys what is derived from the whole array (the re-ranking neighbour
    cache). It reads the array once, in blocks of ~16 MB (a memory map stays
    on disk): about 1 GB/s.
    """
    h = hashlib.blake2b(f"{vectors.shape}|{vectors.dtype.str}|".encode(), digest_size=16)
    step = max(1, _HASH_CHUNK_BYTES // max(1, vectors.itemsize * int(np.prod(vectors.shape[1:]))))
    for start in range(0, vectors.shape[0], step):
        h.update(np.ascontiguousarray(vectors[start : start + step]).data)
    return h.hexdigest()


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the ids, one per line, in order: names an id list without storing it."""
    return sha256_text("\n".join(ids))


def ids_digest_of(owner: Any) -> str:
    """:func:`ids_digest` of ``owner.ids`` (an :class:`Embeddings` or a gallery), remembered on ``owner`` for as long
    as ``owner.ids`` is the same list of the same length: a server describing its 1M-id gallery on every
    request hashes it once. (Replace ``ids``, or change them through ``Gallery.add``/``remove``, never in place.)"""
    ids = owner.ids
    memo = getattr(owner, "_ids_digest_memo", None)
    if memo is None or memo[0] is not ids or memo[1] != len(ids):
        memo = (ids, len(ids), ids_digest(ids))
        object.__setattr__(owner, "_ids_digest_memo", memo)
    return memo[2]


def manifest_path(npy_path: str | os.PathLike[str]) -> Path:
    """``gallery.npy`` -> ``gallery.json``."""
    return Path(npy_path).with_suffix(".json")


@dataclass
class Embeddings:
    """An (N, D) float32 matrix of L2-normalised rows and what is known about it.

    ``vectors`` (N, D) float32; ``ids`` one str per row. The same files ``clipret embed`` writes:
    :meth:`save` and :meth:`load`.

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
    digest: str | None = None  # array_digest of the vectors, as recorded in the manifest
    content: str | None = None  # content_hash of the vectors, as recorded in the manifest
    root: Path | None = None  # the folder the ids are paths relative to, when known

    @property
    def meta(self) -> dict[str, Any]:
        """What the manifest records besides the ids: fingerprint, flags, skipped files, root, path."""
        return {"fingerprint": self.fingerprint, "flags": dict(self.flags), "skipped": list(self.skipped),
                "root": str(self.root) if self.root is not None else None,
                "path": str(self.path) if self.path is not None else None}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (.npy) and its manifest, as ``clipret embed`` writes them; return ``path``."""
        save_embeddings(path, self.vectors, self.ids, fingerprint=self.fingerprint, flags=self.flags,
                        skipped=self.skipped, root=self.root)
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> Embeddings:
        """Read an embeddings ``.npy`` and its manifest (see :func:`load_embeddings`)."""
        return load_embeddings(path, mmap=mmap)

    def full_hash(self) -> str:
        """The manifest's :func:`content_hash`, or (older manifests, no manifest) the hash computed now."""
        if self.content is None:
            self.content = content_hash(self.vectors)
        return self.content

    @property
    def dim(self) -> int:
        """D, the width of ``vectors`` (N, D)."""
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
    root: str | os.PathLike[str] | None = None,
    mkdir: bool = True,
) -> Path:
    """Write ``path`` (.npy, (N, D) float32) and its manifest, both atomically.
    ``mkdir=False``: a missing folder is an error, not created (:func:`atomic_path`).

    The array is written first and the manifest last. The manifest records
    the array's :func:`array_digest`, so a pair left inconsistent by a kill
    between the two renames (new array, old manifest) is refused on load.
    ``root`` is the folder the ids are relative to (recorded resolved), so
    that an id names one source file (the self-match rule of
    :mod:`clipret.retrieval.selfmatch`).
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ClipretError(f"embeddings must be written to a .npy file, got {path}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"vectors {vectors.shape} do not match {len(ids)} ids")
    with atomic_open(path, "wb", size_hint=vectors.nbytes, mkdir=mkdir) as fh:
        np.save(fh, vectors, allow_pickle=False)
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "clipret_version": __version__,
        "count": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "dtype": "float32",
        "normalized": True,
        "content_digest": array_digest(vectors),
        "content_blake2b": content_hash(vectors),
        "model_fingerprint": fingerprint,
        "root": str(Path(root).resolve()) if root is not None else None,
        "flags": dict(flags or {}),
        "ids": list(ids),
        "skipped": [dict(s) for s in skipped],
    }
    write_json(manifest_path(path), manifest, mkdir=mkdir)
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
    digest = meta.get("content_digest")
    if digest is not None and digest != array_digest(vectors):
        raise ClipretError(
            f"{path} does not match its manifest {side.name} (the pair was interrupted mid-write, or one file was "
            "replaced); re-run `clipret embed` to regenerate both"
        )
    return Embeddings(
        vectors,
        ids,
        fingerprint=meta.get("model_fingerprint"),
        flags=dict(meta.get("flags") or {}),
        skipped=list(meta.get("skipped") or []),
        path=path,
        digest=digest,
        content=meta.get("content_blake2b") if isinstance(meta.get("content_blake2b"), str) else None,
        root=Path(meta["root"]) if isinstance(meta.get("root"), str) else None,
    )


def _check_finite(vectors: np.ndarray, path: Path, chunk: int = 65536) -> None:
    for start in range(0, vectors.shape[0], chunk):
        block = np.asarray(vectors[start : start + chunk])
        if not np.isfinite(block).all():
            row = start + int(np.argwhere(~np.isfinite(block))[0, 0])
            raise ClipretError(f"{path} contains a non-finite value (row {row}); re-embed these images")
