"""Thumbnails: an image file -> a small RGB image, or the reason it cannot be shown.

Images are decoded with :func:`clipret.data.decode.load_rgb` (the same robust decoding and
decompression-bomb guard as embedding) and shrunk to at most ``size`` pixels on the longest
side (never enlarged). The HTML report embeds them as base64 JPEG ``data:`` URIs.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

__all__ = ["JPEG_QUALITY", "Thumbs", "data_uri", "thumbnail"]

JPEG_QUALITY = 80


def thumbnail(path: Path | None, size: int) -> tuple[Image.Image | None, str | None]:
    """``(image, None)``: the RGB image at ``path``, its longest side at most ``size`` px;
    ``(None, reason)`` when there is no path or the file cannot be read."""
    from clipret.data.decode import load_rgb

    if path is None:
        return None, "image folder unknown"
    if not path.is_file():
        return None, "missing"
    img, reason = load_rgb(path, min_side=size)
    if img is None:
        return None, reason or "unreadable"
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img, None


def data_uri(img: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """``data:image/jpeg;base64,...`` of an RGB image."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbs:
    """Each image made once: ``get(key, path)`` -> (image or None, reason), cached by ``key``."""

    def __init__(self, size: int) -> None:
        if size < 8:
            from clipret.errors import ClipretError

            raise ClipretError(f"--thumb must be at least 8 px, got {size}")
        self.size = size
        self._cache: dict[str, tuple[Image.Image | None, str | None]] = {}

    def get(self, key: str, path: Path | None) -> tuple[Image.Image | None, str | None]:
        if key not in self._cache:
            self._cache[key] = thumbnail(path, self.size)
        return self._cache[key]
