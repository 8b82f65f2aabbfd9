"""One validated search query, and the one error type a request can fail with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Query", "RequestError"]

#: What a query can be: an image (upload or base64), a vector, an id already in the gallery, or text.
KINDS = ("image", "vector", "id", "text")


@dataclass(frozen=True)
class Query:
    """A query the service can run as it is (every value already checked).

    ``value``: an RGB PIL image (``image``), a (D,) float32 unit vector (``vector``), a gallery
    id (``id``) or a non-blank string (``text``). ``k`` results; ``qe`` query-expansion neighbours
    (0: off); ``rerank``: k-reciprocal re-ranking; ``tta``: None, ``flip`` or ``flip,scales``
    (images only).
    """

    kind: str
    value: Any = field(repr=False)
    k: int = 10
    qe: int = 0
    rerank: bool = False
    tta: str | None = None


class RequestError(Exception):
    """A request the service refuses: an HTTP ``status``, a short machine ``kind`` and a one-line ``detail``.

    kinds: ``too_large`` (413), ``bad_image`` (400), ``bad_request`` (400), ``no_text`` (400: no
    gallery in a text tower's space), ``bad_vector`` and ``bad_option`` (422), ``unknown_id`` (404),
    ``unauthorized`` (401), ``not_ready`` (503).
    """

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = int(status), kind, detail
