"""What ``clipret serve`` is told: galleries, models, limits, the token and where to bind. Torch-free."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from clipret.errors import ClipretError

__all__ = ["Settings", "is_loopback", "parse_size"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"10MB"`` -> 10_000_000 bytes (kB, MB, GB are decimal; KiB, MiB, GiB binary; a bare number is bytes)."""
    match = _SIZE.match(str(text))
    unit = match[2].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ClipretError(f"cannot read the size {text!r}; write it like 10MB, 512kB or 1048576")
    size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise ClipretError(f"the size {text!r} must be more than 0 bytes")
    return size


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """The service's settings; :meth:`check` refuses unsafe or impossible ones in one line.

    ``max_upload``: bytes of one request body (an upload, or JSON holding base64 images).
    ``max_batch`` queries go through one forward pass; a batch waits at most ``max_wait_ms`` for
    more queries after its first. ``token``: the bearer token requests must carry (None: none).
    The ``max_*`` and ``rerank_max_gallery`` limits bound what one request may ask for.
    """

    gallery: Path
    model: str
    pretrained: str | None = None
    text_gallery: Path | None = None
    text_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    k: int = 10
    token: str | None = None
    max_upload: int = 10 * 10**6
    max_batch: int = 64
    max_wait_ms: float = 5.0
    device: str = "auto"
    amp: str = "auto"
    max_k: int = 1000  # the largest k one query may ask for
    max_qe: int = 50  # the most query-expansion neighbours one query may ask for
    max_queries: int = 256  # queries in one /search/batch call
    rerank_max_gallery: int = 20_000  # re-ranking reads the whole gallery's neighbour graph per query
    thumb_size: int = 256  # the longest side of a thumbnail, in pixels

    def check(self) -> None:
        """ClipretError (one line) for a setting that cannot work, or a public bind without a token."""
        if not is_loopback(self.host) and not self.token:
            raise ClipretError(f"binding {self.host} lets other machines search this gallery: pass --token-env NAME "
                               "(an environment variable holding a secret token), or bind 127.0.0.1")
        if self.token is not None and not self.token.strip():
            raise ClipretError("the token is empty; set the --token-env variable to a secret string")
        if not 0 < self.port < 65536:
            raise ClipretError(f"--port must be 1..65535, got {self.port}")
        if not 0 < self.k <= self.max_k:
            raise ClipretError(f"--k must be 1..{self.max_k}, got {self.k}")
        if self.max_batch < 1:
            raise ClipretError(f"--max-batch must be at least 1 (1 turns micro-batching off), got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ClipretError(f"--max-wait-ms must be 0..10000, got {self.max_wait_ms}")
        if self.max_upload <= 0:
            raise ClipretError("--max-upload must be more than 0 bytes")
