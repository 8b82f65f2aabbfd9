from collections import Counter

import numpy as np
import pytest

from clipret.data.sampler import PKBatchSampler, pk_batches, resolve_p


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def _check_composition(batch, labels, p, k):
    """Slow check: exactly P distinct classes, exactly K images of each."""
    counts = Counter(labels[i] for i in batch)
    assert len(counts) == p
    assert all(v == k for v in counts.values())


def test_every_batch_is_p_by_k_and_covers_the_epoch():
    labels = _labels([10, 12, 8, 9, 16, 11])
    s = PKBatchSampler(labels, p=3, k=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == s.epoch_length(0) > 0
    for b in batches:
        assert len(b) == 12
        _check_composition(b, labels, 3, 4)
    used = Counter(i for b in batches for i in b)
    # about one pass: most images appear, none more than a few times
    assert len(used) >= 0.8 * len(labels)
    assert max(used.values()) <= 2


def test_small_classes_are_sampled_with_replacement_not_dropped():
    labels = _labels([2, 1, 9, 9, 9])
    s = PKBatchSampler(labels, p=2, k=4, seed=0)
    assert s.small_classes == 2
    batches = []
    for epoch in range(5):
        s.set_epoch(epoch)
        batches += list(s)
    for b in batches:
        _check_composition(b, labels, 2, 4)
    with_tiny = [b for b in batches if 1 in {labels[i] for i in b}]
    assert with_tiny, "the one-image class must appear, not be dropped"
    only_image = int(np.flatnonzero(labels == 1)[0])
    assert all(b.count(only_image) == 4 for b in with_tiny)  # repeated K times
    assert any(0 in {labels[i] for i in b} for b in batches)


def test_resolve_p_clamps_with_warning():
    assert resolve_p(5, 8) == (5, resolve_p(5, 8)[1])
    p, warning = resolve_p(5, 8)
    assert p == 5 and "P=8" in warning
    assert resolve_p(10, 8) == (8, None)
    with pytest.raises(ValueError):
        pk_batches(_labels([4, 4]), p=3, k=2, rng=np.random.default_rng(0))
    labels = _labels([6, 6, 6])
    s = PKBatchSampler(labels, p=resolve_p(3, 32)[0], k=2)
    for b in s:
        _check_composition(b, labels, 3, 2)


def test_seeded_and_epoch_defined():
    labels = _labels([7, 9, 5, 8, 6])
    a = PKBatchSampler(labels, 2, 3, seed=4)
    b = PKBatchSampler(labels, 2, 3, seed=4)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    np.random.seed(0)
    first = list(a)
    np.random.seed(123)  # the global numpy RNG plays no part
    assert list(a) == first


def test_ddp_ranks_get_disjoint_equal_shares():
    labels = _labels([9] * 8)
    full = PKBatchSampler(labels, 2, 3, seed=2, world_size=1)
    ranks = [PKBatchSampler(labels, 2, 3, seed=2, rank=r, world_size=3) for r in range(3)]
    lengths = {len(r) for r in ranks}
    assert len(lengths) == 1
    got = [tuple(b) for r in ranks for b in r]
    want = [tuple(b) for b in list(full)[: len(got)]]
    assert sorted(got) == sorted(want) and len(set(got)) == len(got)


def test_start_batch_resumes_mid_epoch():
    labels = _labels([8, 8, 8, 8])
    s = PKBatchSampler(labels, 2, 2, seed=9)
    s.set_epoch(3)
    whole = list(s)
    s.set_epoch(3, start_batch=2)
    assert list(s) == whole[2:] and len(s) == len(whole) - 2
