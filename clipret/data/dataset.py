"""A torch Dataset over image ids that never crashes on a bad file.

With a ``seed``, every item's random augmentation is drawn from torch's RNG
reseeded for that item from (seed, epoch, index, draw), inside
``__getitem__``: the result does not depend on which worker process loads
the item, or on how many there are, so a run with ``--workers 2`` equals one
with ``--workers 0``, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clipret.data.decode import load_rgb
from clipret.data.layout import id_to_path


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """A 63-bit torch seed for one draw of one item in one epoch (all arguments non-negative)."""
    state = np.random.SeedSequence([seed, epoch, index, draw]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImageFolderDataset(Dataset):
    """Items are ``{"image": (3, H, W) tensor or None, "index": i, "error": reason or ""}``.

    A file that fails to decode yields ``image=None`` and its reason, so the
    caller can skip it while keeping rows and ids aligned (see :func:`collate`).

    A key is an index ``i`` or a pair ``(i, draw)`` (see
    :class:`clipret.data.sampler.PKBatchSampler` ``with_draws``). With
    ``seed`` set, the transform runs under torch's RNG seeded by
    :func:`sample_seed` ``(seed, epoch, i, draw)``; call :meth:`set_epoch`
    before each epoch. The caller's RNG state is left as it was.

    ``decode_side``: decode JPEGs at a reduced scale whose sides stay at
    least this many pixels (see :func:`clipret.data.decode.load_rgb`).
    """

    def __init__(self, folder: str | Path, ids: Sequence[str], transform: Callable, *, seed: int | None = None,
                 decode_side: int | None = None) -> None:
        self.folder = Path(folder)
        self.ids = list(ids)
        self.transform = transform
        self.seed = seed
        self.decode_side = decode_side  # see clipret.data.decode.load_rgb(min_side=...)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        img, reason = load_rgb(id_to_path(self.folder, self.ids[index]), self.decode_side)
        if img is None:
            return {"image": None, "index": index, "error": reason or "unreadable"}
        if self.seed is None:
            return {"image": self.transform(img), "index": index, "error": ""}
        # torch's CPU generator only: torch.manual_seed would also seed every accelerator (~0.4 ms per call)
        saved = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index, draw))
            image = self.transform(img)
        finally:
            torch.set_rng_state(saved)
        return {"image": image, "index": index, "error": ""}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good images; list the bad ones as (index, reason).

    Returns ``{"images": (B', 3, H, W) or None, "indices": (B',) long, "errors": [(i, reason)]}``.
    """
    good = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "indices": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "errors": [(it["index"], it["error"]) for it in items if it["image"] is None],
    }
