"""Fashion-MNIST from its four idx files (raw or gzipped) into clipret's layout.

Debian's ``dataset-fashion-mnist`` package installs the gzipped idx files in
``/usr/share/datasets/fashion-mnist``; ``CLIPRET_FASHION_MNIST`` may name another folder, and
torchvision's download keeps them in ``FashionMNIST/raw``. Training images come from the train
split; query and gallery images from the test split, disjoint. Files are named by their index
in the original split (``train_01234.png``, ``q_00042.png``, ``g_00077.png``), grayscale PNG.

Draws use ``np.random.default_rng([seed, 0])`` (training) and ``[seed, 1]`` (test), class by
class in label order. ``train_classes``/``test_classes`` keep only some classes (an open-set
split); every class is still drawn, so a kept class gets the same images as in a full export.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.prepare.plan import Entry, Plan, entries

__all__ = ["CLASS_NAMES", "FILES", "ENV_VAR", "DEFAULT_DIRS", "IdxFormatError", "read_idx", "find_fashion_mnist",
           "plan_fashion_mnist", "png_bytes"]

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
POLICY = ("official train/test split; the test images of each class are drawn (seeded) into --query-per-class "
          "queries and the rest (or --gallery-per-class) gallery images, disjoint")


class IdxFormatError(ClipretError, ValueError):
    """An idx file whose header or size is wrong."""


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(dirs: Sequence[Path] | None = None) -> Path | None:
    """First folder holding all four idx files (raw or .gz), also looking in its ``FashionMNIST/raw``
    (torchvision's download); default folders: $CLIPRET_FASHION_MNIST, then Debian's."""
    if dirs is None:
        env = os.environ.get(ENV_VAR)
        dirs = ([Path(env).expanduser()] if env else []) + list(DEFAULT_DIRS)
    for d in dirs:
        for cand in (Path(d), Path(d) / "FashionMNIST" / "raw"):
            if cand.is_dir() and all(_idx_path(cand, stem) for stem in FILES.values()):
                return cand
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
    images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
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


def png_bytes(img: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) uint8 array, resized (bicubic) to ``size``×``size`` px if given."""
    from PIL import Image

    im = Image.fromarray(img, "L" if img.ndim == 2 else "RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def settings(*, train_per_class: int | None, query_per_class: int, gallery_per_class: int | None, seed: int,
             size: int | None, train_classes: Sequence[int] | None, test_classes: Sequence[int] | None) -> dict[str, Any]:
    """The settings that decide a Fashion-MNIST layout (what ``prepare.json`` records)."""
    every = list(range(len(CLASS_NAMES)))
    return {"train_per_class": train_per_class, "query_per_class": query_per_class, "gallery_per_class": gallery_per_class,
            "seed": seed, "size": size, "train_classes": sorted(train_classes) if train_classes is not None else every,
            "test_classes": sorted(test_classes) if test_classes is not None else every}


def plan_fashion_mnist(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of a Fashion-MNIST layout with the :func:`settings` ``cfg`` (idx files in ``src``)."""
    n_train, n_query, n_gallery = cfg["train_per_class"], cfg["query_per_class"], cfg["gallery_per_class"]
    seed, size = cfg["seed"], cfg["size"]
    if (n_train is not None and n_train < 1) or n_query < 1 or (n_gallery is not None and n_gallery < 1):
        raise ClipretError("images per class must be at least 1 for training, query and gallery")
    if (size is not None and size < 8) or seed < 0:
        raise ClipretError(f"size must be at least 8 and seed non-negative (got size={size}, seed={seed})")
    keep_train, keep_test = set(cfg["train_classes"]), set(cfg["test_classes"])
    if not keep_train or not keep_test or not (keep_train | keep_test) <= set(range(len(CLASS_NAMES))):
        raise ClipretError(f"train and test classes must be non-empty subsets of 0..{len(CLASS_NAMES) - 1}")
    src = find_fashion_mnist([src]) or src  # also torchvision's FashionMNIST/raw below it
    arrays = {"train": _load_split(src, "train"), "test": _load_split(src, "test")}
    train_y, test_y = arrays["train"][1], arrays["test"][1]
    rng_train, rng_test = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    parts: dict[str, list[tuple[str, str, Any]]] = {"training": [], "query": [], "gallery": []}
    for c, name in enumerate(CLASS_NAMES):
        train_idx = np.sort(_draw(train_y, c, n_train, c in keep_train, rng_train, "training"))
        n_class = int((test_y == c).sum())
        if n_gallery is None and c in keep_test and n_query >= n_class:
            raise ClipretError(f"class {name} has only {n_class} test images, cannot take {n_query} queries and a gallery")
        n_test = n_query + n_gallery if n_gallery is not None else n_class
        test_idx = _draw(test_y, c, n_test, c in keep_test, rng_test, "query + gallery")
        parts["training"] += [(name, f"train_{i:05d}.png", ("train", i)) for i in train_idx.tolist()]
        parts["query"] += [(name, f"q_{i:05d}.png", ("test", i)) for i in np.sort(test_idx[:n_query]).tolist()]
        parts["gallery"] += [(name, f"g_{i:05d}.png", ("test", i)) for i in np.sort(test_idx[n_query:]).tolist()]

    def fill(todo: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        for e in todo:
            split, i = e.key
            yield e, png_bytes(arrays[split][0][i], size)

    return Plan("fashion-mnist", [e for split, items in parts.items() for e in entries(split, items)], fill)
