"""The vectors an index is built from: one or several embeddings files, read in chunks.

Inputs are ``.npy`` files (each with its ``.json`` manifest) or folders of
them, taken in the order given; a folder contributes its ``*.npy`` files in
sorted name order (the ``shard-000000.npy`` ... a sharded ``embed`` writes).
Every file is a read-only memory map, so a gallery larger than RAM is
streamed ``chunk`` rows at a time, and the training sample gathers only its
own rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipret.artifacts import Embeddings, load_embeddings
from clipret.errors import ClipretError

UNIT_TOLERANCE = 1e-4  # rows whose norm is further than this from 1 are re-normalised


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files in reading order: each path as given, a folder replaced by its sorted ``*.npy`` files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.npy") if not f.name.startswith("."))
            if not found:
                raise ClipretError(f"folder {p} holds no .npy embeddings; pass the files from `clipret embed`")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ClipretError(f"embeddings not found: {p}")
    if not files:
        raise ClipretError("no embeddings given; pass one or more .npy files or folders")
    return files


def unit_rows(block: np.ndarray) -> np.ndarray:
    """A float32 copy of (n, D) ``block`` whose non-zero rows have unit L2 norm.

    Rows already within ``UNIT_TOLERANCE`` of norm 1 are left bit-for-bit as
    they are, so a flat index scores exactly like the exact searcher.
    """
    out = np.array(block, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(out, axis=1)
    fix = (np.abs(norms - 1) > UNIT_TOLERANCE) & (norms > 0)
    if fix.any():
        out[fix] /= norms[fix, None]
    return out


@dataclass
class GallerySource:
    """Several embeddings files seen as one (N, D) gallery, in the order given."""

    parts: list[Embeddings]

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike[str] | Embeddings]) -> GallerySource:
        """Embeddings files or folders of them (in order), or :class:`Embeddings` already in memory."""
        if paths and all(isinstance(p, Embeddings) for p in paths):
            return cls(list(paths))  # type: ignore[arg-type]
        return cls([load_embeddings(f, mmap=True) for f in expand_inputs(paths)])  # type: ignore[arg-type]

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def ids(self) -> list[str]:
        return [i for p in self.parts for i in p.ids]

    @property
    def fingerprint(self) -> str | None:
        return self.parts[0].fingerprint

    @property
    def flags(self) -> dict[str, Any]:
        return dict(self.parts[0].flags)

    def check(self, *, allow_mismatch: bool = False) -> list[str]:
        """Raise on mixed dims, fingerprints or flags (the last two unless ``allow_mismatch``) and on repeated ids.

        Returns warnings for mismatches that ``allow_mismatch`` let through.
        """
        first = self.parts[0]
        warnings: list[str] = []
        for p in self.parts[1:]:
            if p.dim != first.dim:
                raise ClipretError(f"{p.path} has dim {p.dim} but {first.path} has {first.dim}; index embeddings of one model")
            warnings += check_same_model(p, first.fingerprint, first.flags, str(first.path), allow_mismatch=allow_mismatch)
        ids = self.ids
        if len(set(ids)) != len(ids):
            raise ClipretError(f"the inputs repeat ids ({', '.join(repeated(ids)[:3])}); each image may appear once")
        return warnings

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Unit-norm float32 blocks of at most ``size`` rows, in gallery order."""
        for part in self.parts:
            for start in range(0, len(part), size):
                yield unit_rows(part.vectors[start : start + size])

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Unit-norm float32 (len(rows), D) of the given sorted gallery rows (a training sample)."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        offset = 0
        for part in self.parts:
            lo, hi = np.searchsorted(rows, [offset, offset + len(part)])
            if hi > lo:
                out[lo:hi] = unit_rows(part.vectors[rows[lo:hi] - offset])
            offset += len(part)
        return out


def check_same_model(part: Embeddings, fingerprint: str | None, flags: dict[str, Any], other: str, *,
                     allow_mismatch: bool) -> list[str]:
    """Compare one input's fingerprint and flags with ``other``'s; raise or return a warning."""
    problems = []
    if part.fingerprint and fingerprint and part.fingerprint != fingerprint:
        problems.append(f"{part.path} comes from another model than {other} (fingerprints {part.fingerprint} vs {fingerprint})")
    if part.fingerprint and fingerprint and part.flags != flags:  # flags only mean something in clipret manifests
        problems.append(f"{part.path} was embedded with other flags than {other} ({part.flags} vs {flags})")
    if problems and not allow_mismatch:
        raise ClipretError(problems[0] + "; re-embed it, or pass --allow-mismatch if this is intended")
    return problems


def repeated(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i in ids:
        if i in seen:
            out.append(i)
        seen.add(i)
    return out


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers out of ``n``, sorted, drawn from ``seed`` (all rows if size >= n)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)
