"""CIFAR-100 from its python tarball (``cifar-100-python.tar.gz``) into clipret's layout.

The tarball holds ``cifar-100-python/train``, ``test`` and ``meta``: pickled dicts with
``b'data'`` (N, 3072) uint8 (1024 red, then green, then blue values of a 32×32 image, row by
row), ``b'fine_labels'`` and ``b'filenames'``; ``meta`` holds ``b'fine_label_names'``. They are
read with :class:`~clipret.prepare.unpickle.ArrayUnpickler`, never a plain ``pickle.load``.
Images are written as RGB PNG named by their index in the split (``train_01234.png``,
``test_00042.png``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.prepare.archive import open_raw, read_all
from clipret.prepare.idx import png_bytes
from clipret.prepare.plan import Entry, Plan, entries, split_query_gallery, subsample
from clipret.prepare.unpickle import load_arrays

__all__ = ["POLICY", "ARCHIVE", "plan_cifar100", "read_split"]

ARCHIVE = "cifar-100-python.tar.gz"
TOP = "cifar-100-python"
POLICY = ("official train/test split (500 + 100 images per class); the 100 test images of each class are drawn "
          "(seeded) into --query-per-class queries and the rest (or --gallery-per-class) gallery images")


def _get(d: Any, key: str, what: str) -> Any:
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise ClipretError(f"{what} has no {key!r} entry; it is not a CIFAR-100 python file")


def read_split(data: bytes, what: str) -> tuple[np.ndarray, list[int]]:
    """(images (N, 32, 32, 3) uint8, fine labels) of one pickled CIFAR-100 split."""
    d = load_arrays(data, what)
    raw = np.asarray(_get(d, "data", what))
    labels = [int(x) for x in _get(d, "fine_labels", what)]
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3072 or len(raw) != len(labels):
        raise ClipretError(f"{what}: data {raw.shape} {raw.dtype} with {len(labels)} labels is not CIFAR-100's (N, 3072) uint8")
    return raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def plan_cifar100(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of CIFAR-100 (``cfg``: seed, query_per_class, gallery_per_class, train_per_class, size)."""
    raw = open_raw(src, [ARCHIVE, "cifar-100-python.tar"], TOP, "cifar100")
    files = read_all(raw, [f"{TOP}/train", f"{TOP}/test", f"{TOP}/meta"])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(load_arrays(files[f"{TOP}/meta"], "meta"), "fine_label_names", "meta")]
    arrays = {split: read_split(files[f"{TOP}/{split}"], f"{raw.where}:{split}") for split in ("train", "test")}
    for split, (_, labels) in arrays.items():
        if labels and not 0 <= min(labels) <= max(labels) < len(names):
            raise ClipretError(f"{raw.where}:{split}: labels outside 0..{len(names) - 1}")
    train_labels = [names[y] for y in arrays["train"][1]]
    test_labels = [names[y] for y in arrays["test"][1]]
    keep = subsample(train_labels, cfg["train_per_class"], cfg["seed"])
    query, gallery = split_query_gallery(test_labels, cfg["query_per_class"], cfg["seed"], cfg["gallery_per_class"])
    items = entries("training", [(train_labels[i], f"train_{i:05d}.png", ("train", i)) for i in keep])
    items += entries("query", [(test_labels[i], f"test_{i:05d}.png", ("test", i)) for i in query])
    items += entries("gallery", [(test_labels[i], f"test_{i:05d}.png", ("test", i)) for i in gallery])
    size = cfg.get("size")

    def fill(todo: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        for e in todo:
            split, i = e.key
            yield e, png_bytes(arrays[split][0][i], size)

    return Plan("cifar100", items, fill)
