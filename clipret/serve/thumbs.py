"""Gallery thumbnails: only for ids in a gallery's manifest, only from under the manifest's ``root``.

The id in a URL is data, never a path to open. :func:`item_path` answers None (the app's 404)
without reading any file unless every check holds: the id is one of the gallery's own ids; it is a
safe relative path (:func:`clipret.data.layout.id_to_path`: no ``..``, not absolute); and the
path, with every symlink resolved, is still inside the resolved root. A symlink inside the root
that points outside it is refused like ``../``.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

from clipret.errors import ClipretError

__all__ = ["item_path", "thumbnail_jpeg"]


def item_path(item: str, ids: Any, root: str | os.PathLike[str] | None) -> Path | None:
    """The file of gallery id ``item`` under ``root``, or None when it must not be served.

    ``ids``: the gallery's ids (a set or dict: membership is tested). Only ``os.path.realpath`` and
    ``stat`` touch the disk here.
    """
    from clipret.data.layout import id_to_path

    if root is None or not isinstance(item, str) or "\x00" in item or item not in ids:
        return None
    try:
        candidate = id_to_path(root, item)
    except ClipretError:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root or not os.path.isfile(real):
        return None
    return Path(real)


def thumbnail_jpeg(path: Path, size: int) -> bytes | None:
    """A JPEG of ``path`` whose longer side is at most ``size`` pixels, or None when it cannot be read.

    Decoded by :func:`clipret.data.decode.load_rgb` (the bomb guard holds). Cached by path,
    size and modification time (a file replaced on disk gets a new thumbnail).
    """
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _cached_thumbnail(str(path), int(size), stamp)


@functools.lru_cache(maxsize=2048)
def _cached_thumbnail(path: str, size: int, stamp: int) -> bytes | None:
    from clipret.data.decode import load_rgb

    img, _ = load_rgb(path, min_side=size)
    if img is None:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()
