"""Checks that a query set and a gallery can be compared at all, and how results name them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clipret.artifacts import Embeddings
from clipret.artifacts.embeddings import ids_digest_of
from clipret.errors import ClipretError


def check_compatible(query: Embeddings, gallery: Embeddings, *, allow_mismatch: bool = False) -> list[str]:
    """Raise on a dim mismatch or on different model fingerprints; return warnings.

    Fingerprints are compared only when both sides carry one (embeddings made
    by other tools may not). ``allow_mismatch`` turns a fingerprint mismatch
    into a warning. Different test-time augmentation on the two sides is a
    warning too.
    """
    warnings: list[str] = []
    if query.dim != gallery.dim:
        raise ClipretError(f"query dim {query.dim} != gallery dim {gallery.dim}; embed both with the same model")
    if query.fingerprint and gallery.fingerprint and query.fingerprint != gallery.fingerprint:
        msg = (f"query and gallery come from different models (fingerprints {query.fingerprint} vs "
               f"{gallery.fingerprint})")
        if not allow_mismatch:
            raise ClipretError(msg + "; re-embed one side, or pass --allow-mismatch if this is intended")
        warnings.append(msg)
    q_tta, g_tta = query.flags.get("tta"), gallery.flags.get("tta")
    if q_tta != g_tta:
        warnings.append(f"the queries were embedded with --tta {q_tta or 'none'} but the gallery with --tta "
                        f"{g_tta or 'none'}; TTA should be symmetric: embed both sides with the same --tta")
    return warnings


SKIPPED_RECORDED = 1000  # unreadable files a results sidecar names per side (all are counted)


def describe(emb: Embeddings, source: str | Path | None = None, *, relative_to: str | Path | None = None) -> dict[str, Any]:
    """What a results sidecar records of one side: where it came from and which ids, in which order.

    ``relative_to``: the results file; ``relpath`` is then the path from its folder too, so a
    results folder moved together with its gallery still finds it (:func:`recorded_path`).
    """
    where = source if source is not None else emb.path
    root = getattr(emb, "root", None)
    skipped = [dict(s) for s in (getattr(emb, "skipped", None) or [])]  # the files that could not be read
    rel = None
    if where is not None and relative_to is not None:
        rel = os.path.relpath(Path(where).resolve(), Path(relative_to).resolve().parent)
    return {
        "path": str(Path(where).resolve()) if where is not None else None,
        "relpath": rel,
        "root": str(root) if root is not None else None,
        "content_blake2b": getattr(emb, "content", None),
        "count": len(emb),
        "ids_sha256": ids_digest_of(emb),
        "fingerprint": emb.fingerprint,
        "flags": dict(emb.flags),
        "skipped_count": len(skipped),
        "skipped": skipped[:SKIPPED_RECORDED],
    }


def recorded_path(results_path: str | Path, side: dict[str, Any] | None) -> Path | None:
    """Where a side a results sidecar describes is now: its ``relpath`` from the results file's folder
    when that exists (the two were moved together), else its absolute ``path`` (None if neither is recorded)."""
    side = side or {}
    rel = side.get("relpath")
    if isinstance(rel, str):
        moved = Path(results_path).parent / rel
        if moved.exists():
            return moved
    return Path(side["path"]) if isinstance(side.get("path"), str) else None
