"""P×K batches: P classes, K images of each, seeded and defined per epoch.

pytorch-metric-learning's MPerClassSampler defines an "epoch" as 100,000
samples whatever the dataset size, draws from numpy's global RNG, and needs
``K * n_classes >= batch``. This sampler instead:

* covers every image about once per epoch (len ≈ N / (P*K) batches);
* is a pure function of (labels, P, K, seed, epoch): runs are reproducible;
* samples a class with fewer than K images with replacement instead of
  dropping it (:attr:`PKBatchSampler.small_classes` counts them);
* shards whole batches across DDP ranks: every rank builds the same global
  list and takes every ``world_size``-th batch, so all ranks run equal steps;
* can start mid-epoch (``start_batch``), which is what resuming needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def pk_batches(labels: Sequence[int] | np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of P×K batches of dataset indices.

    Each class's indices are shuffled and cut into groups of K; a short last
    group (or a class smaller than K) is topped up by drawing from the same
    class with replacement. Each batch takes one group from each of P distinct
    classes, chosen with probability proportional to the groups a class has
    left, so large classes are spread over the whole epoch. The epoch ends
    when fewer than P classes have groups left.

    Returns a list of (P*K,) int64 arrays, class-contiguous within each batch.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if p > len(classes):
        raise ValueError(f"P={p} exceeds the {len(classes)} classes")
    groups: list[list[np.ndarray]] = []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_groups = -(-len(idx) // k)
        pad = n_groups * k - len(idx)
        if pad:
            idx = np.concatenate([idx, rng.choice(idx, size=pad, replace=len(idx) < pad)])
        groups.append(list(idx.reshape(n_groups, k)))
    remaining = np.array([len(g) for g in groups], dtype=np.float64)
    batches: list[np.ndarray] = []
    while np.count_nonzero(remaining) >= p:
        chosen = rng.choice(len(classes), size=p, replace=False, p=remaining / remaining.sum())
        batches.append(np.concatenate([groups[c].pop() for c in chosen]).astype(np.int64))
        remaining[chosen] -= 1
    return batches


class PKBatchSampler:
    """A ``batch_sampler`` for :class:`torch.utils.data.DataLoader`.

    Call :meth:`set_epoch` before each epoch, as with DistributedSampler.
    ``p`` must not exceed the number of classes; use :func:`resolve_p` first.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError("P and K must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.labels = np.asarray(labels)
        self.p, self.k = p, k
        self.seed, self.rank, self.world_size = seed, rank, world_size
        counts = np.unique(self.labels, return_counts=True)[1]
        self.small_classes = int(np.count_nonzero(counts < k))
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (0-based) and the first batch of this rank to yield."""
        self.epoch, self.start_batch = epoch, start_batch

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = pk_batches(self.labels, self.p, self.k, rng)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def _rank_batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._epoch_batches(self.epoch))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._rank_batches()[self.start_batch :]:
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch, from ``start_batch`` on."""
        return max(0, len(self._rank_batches()) - self.start_batch)

    def epoch_length(self, epoch: int) -> int:
        """Batches this rank gets in the whole of ``epoch`` (the schedule needs this up front).

        The count can differ by a batch or two between epochs, because class
        choice is random; the training loop sums it over all epochs.
        """
        if self._cache is not None and self._cache[0] == epoch:
            return len(self._cache[1])
        return len(self._epoch_batches(epoch))


def resolve_p(n_classes: int, p: int) -> tuple[int, str | None]:
    """Clamp P to the number of classes; return (P, warning or None)."""
    if p > n_classes:
        return n_classes, f"P={p} is more than the {n_classes} training classes; using P={n_classes}"
    return p, None
