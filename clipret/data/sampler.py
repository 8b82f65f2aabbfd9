"""P×K batches: P classes, K images of each, seeded and defined per epoch.

pytorch-metric-learning's MPerClassSampler defines an "epoch" as 100,000
samples whatever the dataset size, draws from numpy's global RNG, and needs
``K * n_classes >= batch``. This sampler instead:

* has an honest epoch: ``ceil(N / (P*K))`` batches for N images, with the
  classes of each batch drawn in proportion to their images not yet seen
  this epoch, so a large class is spread over the whole epoch;
* never repeats an image inside a K-group, unless its class has fewer than
  K images (such a class is sampled with replacement, every image at least
  once per group, and :attr:`PKBatchSampler.small_classes` counts them);
* keeps every batch P distinct classes × K images to the end of the epoch:
  a class whose images have all been seen is re-drawn from a fresh shuffle;
* is a pure function of (labels, P, K, seed, epoch): runs are reproducible;
* shards whole batches across DDP ranks: every rank builds the same global
  list and takes every ``world_size``-th batch, so all ranks run equal steps;
* can start mid-epoch (``start_batch``), which is what resuming needs;
* can tag each index with its draw number in the epoch (``with_draws``), so
  per-sample augmentation seeds tell two draws of one image apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def batches_per_epoch(n_images: int, p: int, k: int) -> int:
    """``ceil(n_images / (p * k))``: enough batches to show every image about once."""
    return -(-n_images // (p * k))


class _ClassStream:
    """The images of one class, served K at a time from successive shuffles."""

    def __init__(self, indices: np.ndarray, k: int, rng: np.random.Generator) -> None:
        self.indices, self.k, self.rng = indices, k, rng
        self.queue = rng.permutation(indices) if len(indices) >= k else indices
        self.pos = 0

    def take(self) -> np.ndarray:
        """(K,) dataset indices, all distinct unless the class has fewer than K images."""
        k, n = self.k, len(self.indices)
        if n < k:  # every image once, the rest with replacement
            extra = self.rng.choice(self.indices, size=k - n, replace=True)
            return self.rng.permutation(np.concatenate([self.indices, extra]))
        left = self.queue[self.pos : self.pos + k]
        self.pos += len(left)
        if len(left) == k:
            return left
        # the shuffle ran out: top up from a fresh one, skipping the images already in this group
        fresh = self.rng.permutation(self.indices)
        top_up = np.flatnonzero(~np.isin(fresh, left))[: k - len(left)]
        self.queue, self.pos = np.delete(fresh, top_up), 0
        return np.concatenate([left, fresh[top_up]])


def inclusion_probabilities(weights: np.ndarray, p: int) -> np.ndarray:
    """(C,) weights -> (C,) probabilities ``min(1, c * w)`` that sum to ``p``.

    ``c`` is found by capping: a class whose share would exceed 1 is taken
    with certainty and the rest share what is left. Needs at least ``p``
    positive weights.
    """
    pi = np.zeros(len(weights))
    free = weights > 0
    need = float(p)
    while True:
        pi[free] = weights[free] * (need / weights[free].sum())
        over = free & (pi >= 1.0)
        if not over.any():
            return pi
        pi[over] = 1.0
        free &= ~over
        need -= int(over.sum())
        if need <= 0 or not free.any():
            pi[free] = 0.0
            return pi


def systematic_sample(pi: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """``p`` distinct indices, index ``c`` included with probability ``pi[c]`` (Madow's systematic πps).

    The classes are laid end to end in a random order, each over a length
    ``pi[c] <= 1``; ``p`` points spaced 1 apart from a uniform start pick them.
    """
    order = rng.permutation(len(pi))
    ends = np.cumsum(pi[order])
    ends *= p / ends[-1]
    return order[np.searchsorted(ends, rng.random() + np.arange(p), side="right")]


def pk_batches(
    labels: Sequence[int] | np.ndarray, p: int, k: int, rng: np.random.Generator, n_batches: int | None = None
) -> list[np.ndarray]:
    """One epoch of P×K batches of dataset indices.

    ``n_batches`` defaults to :func:`batches_per_epoch` of ``len(labels)``.
    Each batch takes one K-group from each of P distinct classes. A class is
    in a batch with probability proportional to its images not yet drawn
    this epoch (capped at 1: a class holding more than 1/P of what is left is
    in every batch). When fewer than P classes have unseen
    images left, the batch is filled with classes whose images have all been
    seen, chosen in proportion to their size.

    Returns a list of (P*K,) int64 arrays, class-contiguous within each batch.
    """
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    if p > len(classes):
        raise ValueError(f"P={p} exceeds the {len(classes)} classes")
    if n_batches is None:
        n_batches = batches_per_epoch(len(labels), p, k)
    streams = [_ClassStream(np.flatnonzero(labels == c), k, rng) for c in classes]
    unseen = sizes.astype(np.float64)
    batches: list[np.ndarray] = []
    for _ in range(n_batches):
        live = np.flatnonzero(unseen > 0)
        if len(live) >= p:
            chosen = systematic_sample(inclusion_probabilities(unseen, p), p, rng)
        else:
            done = np.flatnonzero(unseen == 0)
            refill = rng.choice(done, size=p - len(live), replace=False, p=sizes[done] / sizes[done].sum())
            chosen = rng.permutation(np.concatenate([live, refill]))
        batches.append(np.concatenate([streams[c].take() for c in chosen]).astype(np.int64))
        unseen[chosen] = np.maximum(unseen[chosen] - k, 0)
    return batches


def draw_numbers(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For each position, how many times its index was drawn earlier in ``batches`` (0 = first)."""
    seen: dict[int, int] = {}
    out = []
    for batch in batches:
        draws = np.empty(len(batch), dtype=np.int64)
        for j, i in enumerate(batch.tolist()):
            draws[j] = seen.get(i, 0)
            seen[i] = draws[j] + 1
        out.append(draws)
    return out


class PKBatchSampler:
    """A ``batch_sampler`` for :class:`torch.utils.data.DataLoader`.

    Call :meth:`set_epoch` before each epoch, as with DistributedSampler.
    ``p`` must not exceed the number of classes; use :func:`resolve_p` first.
    Yields lists of dataset indices, or with ``with_draws=True`` lists of
    ``(index, draw)`` pairs, where ``draw`` counts the earlier draws of that
    index in the whole epoch (all ranks), for per-sample augmentation seeds.
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
        with_draws: bool = False,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError("P and K must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.labels = np.asarray(labels)
        self.p, self.k = p, k
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.with_draws = with_draws
        counts = np.unique(self.labels, return_counts=True)[1]
        self.small_classes = int(np.count_nonzero(counts < k))
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[np.ndarray], list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (0-based) and the first batch of this rank to yield."""
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_batches(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            batches = pk_batches(self.labels, self.p, self.k, rng)
            draws = draw_numbers(batches)
            usable = len(batches) - len(batches) % self.world_size
            mine = slice(self.rank, usable, self.world_size)
            self._cache = (self.epoch, batches[mine], draws[mine])
        return self._cache[1], self._cache[2]

    def __iter__(self) -> Iterator[list]:
        batches, draws = self._rank_batches()
        for batch, draw in zip(batches[self.start_batch :], draws[self.start_batch :]):
            yield list(zip(batch.tolist(), draw.tolist())) if self.with_draws else batch.tolist()

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch, from ``start_batch`` on."""
        return max(0, self.epoch_length(self.epoch) - self.start_batch)

    def epoch_length(self, epoch: int) -> int:
        """Batches this rank gets in the whole of ``epoch``; the same for every epoch."""
        n = batches_per_epoch(len(self.labels), self.p, self.k)
        return n // self.world_size


def resolve_p(n_classes: int, p: int) -> tuple[int, str | None]:
    """Clamp P to the number of classes; return (P, warning or None)."""
    if p > n_classes:
        return n_classes, f"P={p} is more than the {n_classes} training classes; using P={n_classes}"
    return p, None
