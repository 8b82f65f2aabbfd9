"""A torch Dataset over image ids that never crashes on a bad file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from clipret.data.decode import load_rgb
from clipret.data.layout import id_to_path


class ImageFolderDataset(Dataset):
    """Items are ``{"image": (3, H, W) tensor or None, "index": i, "error": reason or ""}``.

    A file that fails to decode yields ``image=None`` and its reason, so the
    caller can skip it while keeping rows and ids aligned (see :func:`collate`).
    """

    def __init__(self, folder: str | Path, ids: Sequence[str], transform: Callable) -> None:
        self.folder = Path(folder)
        self.ids = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img, reason = load_rgb(id_to_path(self.folder, self.ids[index]))
        if img is None:
            return {"image": None, "index": index, "error": reason or "unreadable"}
        return {"image": self.transform(img), "index": index, "error": ""}


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
