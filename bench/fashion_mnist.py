"""Benchmark data, not part of the package: export Fashion-MNIST (idx files, raw or gzipped) into clipret's dataset layout.

Debian's ``dataset-fashion-mnist`` package installs the four gzipped idx files
in ``/usr/share/datasets/fashion-mnist``; ``CLIPRET_FASHION_MNIST`` may name
another folder. Training images come from the train split; query and gallery
images from the test split, disjoint. Files are named by their index in the
original split (``train_01234.png``, ``q_00042.png``, ``g_00077.png``).
``train_classes``/``test_classes`` keep only some classes (an open-set split);
the images drawn for a kept class do not depend on which others are kept.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipret.data.layout import ensure_empty_targets, write_labels_csv
from clipret.errors import ClipretError

CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
ENV_VAR = "CLIPRET_FASHION_MNIST"
DEFAULT_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/datasets/fashion_mnist"))
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ClipretError, ValueError):
    """An idx file whose header or size is wrong."""


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(dirs: Sequence[Path] | None = None) -> Path | None:
    """First folder holding all four idx files (raw or .gz); default: $CLIPRET_FASHION_MNIST, then Debian's."""
    if dirs is None:
        env = os.environ.get(ENV_VAR)
        dirs = ([Path(env).expanduser()] if env else []) + list(DEFAULT_DIRS)
    for d in dirs:
        d = Path(d)
        if d.is_dir() and all(_idx_path(d, stem) for stem in FILES.values()):
            return d
    return None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an idx file (gzipped or raw, detected by content) into a native-endian array."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise IdxFormatError(f"{path}: broken gzip data ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise IdxFormatError(f"{path}: idx header is truncated or has no dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise IdxFormatError(f"{path}: header says {dims} ({expected} bytes) but {payload} data bytes follow")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _load_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [_idx_path(src, FILES[f"{split}_{kind}"]) for kind in ("images", "labels")]
    if not all(paths):
        raise ClipretError(f"{src}: missing {FILES[split + '_images']}(.gz) or {FILES[split + '_labels']}(.gz)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
        raise ClipretError(f"{src}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and not (0 <= labels.min() and labels.max() < len(CLASS_NAMES)):
        raise ClipretError(f"{src}: {split} labels must lie in 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def _pick(labels: np.ndarray, c: int, n: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
    idx = np.flatnonzero(labels == c)
    if n is None:
        return idx
    if n > len(idx):
        raise ClipretError(f"class {CLASS_NAMES[c]} has only {len(idx)} images, cannot take {n} for {what}")
    return rng.permutation(idx)[:n]


def _draw(labels: np.ndarray, c: int, n: int | None, keep: bool, rng: np.random.Generator, what: str) -> np.ndarray:
    """:func:`_pick` for a kept class; a class left out is drawn all the same (capped at what it has), so
    the random stream, and the images of the classes after it, do not depend on which classes are kept."""
    if keep:
        return _pick(labels, c, n, rng, what)
    _pick(labels, c, None if n is None else min(n, int((labels == c).sum())), rng, what)
    return np.zeros(0, dtype=np.int64)


def _save(img: np.ndarray, size: int, path: Path) -> None:
    im = Image.fromarray(img, "L")
    (im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BICUBIC)).save(path, compress_level=1)


def export_fashion_mnist(
    src: Path,
    root: Path,
    *,
    train_per_class: int | None,
    query_per_class: int,
    gallery_per_class: int,
    seed: int = 0,
    size: int = 64,
    train_classes: Sequence[int] | None = None,
    test_classes: Sequence[int] | None = None,
) -> dict:
    """Write Fashion-MNIST from ``src`` into ``root`` as ``size``-px grayscale PNGs.

    ``train_per_class=None`` exports the whole train split. Subsets are drawn
    per class with ``np.random.default_rng(seed)``, so they are reproducible.
    ``train_classes`` / ``test_classes`` (class indices, default all) choose
    the classes written to ``training/`` and to ``test/``; every class is
    still drawn, so a kept class gets the same images as in a full export.
    """
    src, root = Path(src), Path(root)
    if (train_per_class is not None and train_per_class < 1) or query_per_class < 1 or gallery_per_class < 1:
        raise ClipretError("images per class must be at least 1 for training, query and gallery")
    if size < 8 or seed < 0:
        raise ClipretError(f"size must be at least 8 and seed non-negative (got size={size}, seed={seed})")
    keep_train = set(range(len(CLASS_NAMES)) if train_classes is None else train_classes)
    keep_test = set(range(len(CLASS_NAMES)) if test_classes is None else test_classes)
    if not keep_train or not keep_test or not (keep_train | keep_test) <= set(range(len(CLASS_NAMES))):
        raise ClipretError(f"train and test classes must be non-empty subsets of 0..{len(CLASS_NAMES) - 1}")
    train_x, train_y = _load_split(src, "train")
    test_x, test_y = _load_split(src, "test")
    ensure_empty_targets(root)
    rng_train, rng_test = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    counts = {"n_train": 0, "n_query": 0, "n_gallery": 0}
    rows: list[tuple[str, str]] = []
    for c, name in enumerate(CLASS_NAMES):
        train_idx = np.sort(_draw(train_y, c, train_per_class, c in keep_train, rng_train, "training"))
        test_idx = _draw(test_y, c, query_per_class + gallery_per_class, c in keep_test, rng_test, "query + gallery")
        parts = {
            ("training", "train", "n_train"): (root / "training" / name, train_x, train_idx),
            ("query", "q", "n_query"): (root / "test" / "query" / name, test_x, np.sort(test_idx[:query_per_class])),
            ("gallery", "g", "n_gallery"): (root / "test" / "gallery" / name, test_x, np.sort(test_idx[query_per_class:])),
        }
        for (split, prefix, key), (folder, images, idx) in parts.items():
            if not len(idx):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx.tolist():
                file_name = f"{prefix}_{i:05d}.png"
                _save(images[i], size, folder / file_name)
                if split != "training":
                    rows.append((f"{name}/{file_name}", name))
            counts[key] += len(idx)
    write_labels_csv(root / "test" / "labels.csv", rows)
    return {"root": str(root), "classes": list(CLASS_NAMES), **counts}
