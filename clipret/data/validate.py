"""A fast up-front pass that finds unreadable training images before an epoch does.

Each image is decoded once; the verdict is cached by (size, mtime), so a
re-run only decodes new or changed files. The cache is a JSON file under
``$CLIPRET_CACHE_DIR`` (default ``$XDG_CACHE_HOME/clipret`` or
``~/.cache/clipret``), one per image folder, written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clipret.artifacts import read_json, write_json
from clipret.data import decode
from clipret.data.decode import load_rgb

CACHE_VERSION = 1


def cache_dir() -> Path:
    base = os.environ.get("CLIPRET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clipret"
    )
    return Path(base)


def _cache_file(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "image-check" / f"{key}.json"


def _stat_key(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_images(
    folder: str | Path,
    ids: Sequence[str],
    *,
    workers: int = 4,
    use_cache: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Decode every ``folder/id``; return {id: reason} for the unreadable ones.

    Verdicts of unchanged files (same size and mtime) come from the cache.
    """
    folder = Path(folder)
    cache_path = _cache_file(folder)
    cached: dict[str, list] = {}
    if use_cache and cache_path.is_file():
        try:
            data = read_json(cache_path, "image-check cache")
            if data.get("version") == CACHE_VERSION and data.get("max_pixels") == decode.MAX_PIXELS:
                cached = data.get("entries", {})
        except Exception:  # a broken cache is just a cold cache
            cached = {}

    keys = {i: _stat_key(folder / i) for i in ids}
    todo = [i for i in ids if keys[i] is None or i not in cached or cached[i][0] != keys[i]]
    todo_set = set(todo)
    verdicts = {i: cached[i][1] for i in ids if i not in todo_set}

    def check(image_id: str) -> tuple[str, str]:
        img, reason = load_rgb(folder / image_id)
        return image_id, "" if img is not None else (reason or "unreadable")

    if on_progress is not None and len(ids) > len(todo):
        on_progress(len(ids) - len(todo))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for image_id, reason in pool.map(check, todo):
            verdicts[image_id] = reason
            if on_progress is not None:
                on_progress(1)

    if use_cache and todo:
        entries = {**cached, **{i: [keys[i], verdicts[i]] for i in ids if keys[i] is not None}}
        try:
            write_json(cache_path, {"version": CACHE_VERSION, "max_pixels": decode.MAX_PIXELS, "folder": str(folder.resolve()), "entries": entries})
        except OSError:
            pass  # a read-only cache location must not stop training
    return {i: r for i, r in verdicts.items() if r}


GRAY_SAMPLE = 64  # images looked at by all_gray


def all_gray(folder: str | os.PathLike[str], ids: Sequence[str], *, sample: int = GRAY_SAMPLE, seed: int = 0) -> bool:
    """Whether the images are gray: every one of ``sample`` of them (drawn with ``seed``) has
    equal R, G and B everywhere. Unreadable images are passed over; none readable is False."""
    import numpy as np

    if not ids:
        return False
    picks = np.random.default_rng(seed).choice(len(ids), size=min(sample, len(ids)), replace=False)
    seen = 0
    for i in sorted(picks.tolist()):
        image, _ = load_rgb(Path(folder) / ids[i], min_side=64)
        if image is None:
            continue
        rgb = np.asarray(image)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            return False
        seen += 1
    return seen > 0
