"""Stratified train/validation split of a labelled id list."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: Sequence[str], val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out ``round(n * val_split)`` images for validation.

    A class keeps at least one training image, and a class that would put a
    single image in validation puts none there (a lone validation image has
    nothing to retrieve). Returns sorted (train_indices, val_indices).
    """
    labels_arr = np.asarray(labels)
    if val_split <= 0:
        return np.arange(len(labels_arr)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 7919])
    val: list[np.ndarray] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        n_val = min(int(round(len(idx) * val_split)), len(idx) - 1)
        if n_val >= 2:
            val.append(rng.choice(idx, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels_arr)), val_idx)
    return train_idx, val_idx
