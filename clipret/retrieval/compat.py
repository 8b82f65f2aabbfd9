"""Checks that a query set and a gallery can be compared at all."""

from __future__ import annotations

from clipret.artifacts import Embeddings
from clipret.errors import ClipretError


def check_compatible(query: Embeddings, gallery: Embeddings, *, allow_mismatch: bool = False) -> list[str]:
    """Raise on a dim mismatch or on different model fingerprints; return warnings.

    Fingerprints are compared only when both sides carry one (embeddings made
    by other tools may not). ``allow_mismatch`` turns a fingerprint mismatch
    into a warning.
    """
    if query.dim != gallery.dim:
        raise ClipretError(f"query dim {query.dim} != gallery dim {gallery.dim}; embed both with the same model")
    if query.fingerprint and gallery.fingerprint and query.fingerprint != gallery.fingerprint:
        msg = (f"query and gallery come from different models (fingerprints {query.fingerprint} vs "
               f"{gallery.fingerprint})")
        if not allow_mismatch:
            raise ClipretError(msg + "; re-embed one side, or pass --allow-mismatch if this is intended")
        return [msg]
    return []
