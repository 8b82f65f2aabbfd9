import math
from collections import Counter

import numpy as np
import pytest

from clipret.data.sampler import (
    PKBatchSampler,
    batches_per_epoch,
    draw_numbers,
    inclusion_probabilities,
    pk_batches,
    resolve_p,
    systematic_sample,
)


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def _groups(batch, labels):
    """Slow split of a batch into {class: [indices]}."""
    groups = {}
    for i in batch:
        groups.setdefault(int(labels[i]), []).append(int(i))
    return groups


def _check_batch(batch, labels, p, k):
    """Slow check: exactly P distinct classes, K images of each, no image twice in a group of a class with >= K images."""
    groups = _groups(batch, labels)
    assert len(groups) == p
    for c, idx in groups.items():
        assert len(idx) == k
        if np.count_nonzero(labels == c) >= k:
            assert len(set(idx)) == k, f"class {c} repeats an image in one group: {idx}"


def test_every_batch_is_p_by_k_and_covers_the_epoch():
    labels = _labels([10, 12, 8, 9, 16, 11])
    s = PKBatchSampler(labels, p=3, k=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == s.epoch_length(0) == math.ceil(66 / 12)
    for b in batches:
        _check_batch(b, labels, 3, 4)
    used = Counter(i for b in batches for i in b)
    assert len(used) >= 0.9 * len(labels)
    assert max(used.values()) <= 2


def test_imbalanced_epoch_is_n_over_pk_batches_not_cut_short():
    """1000/40/40/40 images, P=K=4: 70 batches (N/(P*K)), each with all four classes, no repeats in a group."""
    labels = _labels([1000, 40, 40, 40])
    batches = pk_batches(labels, 4, 4, np.random.default_rng(0))
    assert len(batches) == 70
    for b in batches:
        _check_batch(b.tolist(), labels, 4, 4)
    seen = Counter(int(i) for b in batches for i in b)
    big = [i for i in seen if labels[i] == 0]
    assert len(big) == 70 * 4 and all(seen[i] == 1 for i in big)  # 280 different images of the big class, none twice
    # each small class is shown 280 times: 7 full passes, every image exactly 7 times
    assert all(seen[i] == 7 for i in np.flatnonzero(labels != 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_image_of_a_big_class_is_seen_about_once(seed):
    """A class with 15% of the images (under 1/P): every one of its images is seen once per epoch."""
    sizes = [60] + [20] * 17
    labels = _labels(sizes)
    s = PKBatchSampler(labels, 4, 4, seed=seed)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == math.ceil(400 / 16)
        seen = Counter(i for b in batches for i in b)
        for b in batches:
            _check_batch(b, labels, 4, 4)
        big = np.flatnonzero(labels == 0)
        assert sum(seen[int(i)] >= 1 for i in big) >= 0.95 * len(big)
        assert max(seen[int(i)] for i in big) <= 2
        assert len(seen) >= 0.95 * len(labels)


def test_no_repeat_in_a_group_where_a_shuffle_runs_out():
    """Classes of K+1 and K+2 images: most groups straddle two shuffles; none repeats an image."""
    labels = _labels([5, 6, 5, 6, 5, 7])
    for seed in range(20):
        for b in pk_batches(labels, 3, 4, np.random.default_rng(seed), n_batches=12):
            _check_batch(b.tolist(), labels, 3, 4)


def test_fewer_than_p_classes_left_still_gives_p_classes():
    """One big class and P-1 tiny ones: the tail of the epoch re-draws exhausted classes."""
    labels = _labels([100, 4, 4, 4])
    batches = pk_batches(labels, 4, 4, np.random.default_rng(3))
    assert len(batches) == math.ceil(112 / 16)
    for b in batches:
        _check_batch(b.tolist(), labels, 4, 4)


def test_small_classes_are_sampled_with_replacement_not_dropped():
    labels = _labels([2, 1, 9, 9, 9])
    s = PKBatchSampler(labels, p=2, k=4, seed=0)
    assert s.small_classes == 2
    batches = []
    for epoch in range(5):
        s.set_epoch(epoch)
        batches += list(s)
    for b in batches:
        _check_batch(b, labels, 2, 4)
    only_image = int(np.flatnonzero(labels == 1)[0])
    with_tiny = [b for b in batches if only_image in b]
    assert with_tiny, "the one-image class must appear, not be dropped"
    assert all(b.count(only_image) == 4 for b in with_tiny)  # repeated K times
    pair = set(np.flatnonzero(labels == 0).tolist())
    with_pair = [b for b in batches if pair & set(b)]
    assert with_pair and all(pair <= set(b) for b in with_pair)  # both images of a 2-image class in each of its groups


def test_resolve_p_clamps_with_warning():
    p, warning = resolve_p(5, 8)
    assert p == 5
    assert warning is not None and "P=8" in warning and "5" in warning
    assert resolve_p(10, 8) == (8, None)
    assert resolve_p(8, 8) == (8, None)
    with pytest.raises(ValueError):
        pk_batches(_labels([4, 4]), p=3, k=2, rng=np.random.default_rng(0))


def _ref_inclusion(weights, p):
    """Slow capping: repeatedly give certainty to the classes whose share would pass 1."""
    weights = [float(w) for w in weights]
    certain = set()
    while True:
        rest = [w for c, w in enumerate(weights) if c not in certain and w > 0]
        need = p - len(certain)
        pi = []
        for c, w in enumerate(weights):
            if c in certain:
                pi.append(1.0)
            elif w > 0 and need > 0:
                pi.append(w * need / sum(rest))
            else:
                pi.append(0.0)
        newly = {c for c, v in enumerate(pi) if v >= 1 and c not in certain}
        if not newly:
            return pi
        certain |= newly


@pytest.mark.parametrize("weights,p", [([1, 1, 1, 1], 2), ([100, 1, 1, 1, 1], 3), ([50, 40, 3, 2, 1, 0, 4], 4), ([5, 0, 5], 2)])
def test_inclusion_probabilities_match_reference(weights, p):
    got = inclusion_probabilities(np.array(weights, dtype=float), p)
    np.testing.assert_allclose(got, _ref_inclusion(weights, p), rtol=1e-12)
    assert got.sum() == pytest.approx(p) and got.max() <= 1.0


def test_systematic_sample_hits_its_inclusion_probabilities():
    pi = inclusion_probabilities(np.array([30.0, 10, 5, 5, 3, 1, 1]), 3)
    rng = np.random.default_rng(0)
    counts = np.zeros(len(pi))
    n = 20000
    for _ in range(n):
        picks = systematic_sample(pi, 3, rng)
        assert len(set(picks.tolist())) == 3
        counts[picks] += 1
    np.testing.assert_allclose(counts / n, pi, atol=0.015)


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
    assert list(PKBatchSampler(labels, 2, 3, seed=5)) != first


def test_ddp_ranks_get_disjoint_equal_shares():
    labels = _labels([9] * 8)
    full = PKBatchSampler(labels, 2, 3, seed=2, world_size=1)
    ranks = [PKBatchSampler(labels, 2, 3, seed=2, rank=r, world_size=3) for r in range(3)]
    lengths = {len(r) for r in ranks}
    assert lengths == {len(full) // 3}
    for r, sampler in enumerate(ranks):  # rank r takes global batches r, r+3, r+6, ...
        assert list(sampler) == list(full)[r : 3 * len(sampler) : 3]


def test_start_batch_resumes_mid_epoch():
    labels = _labels([8, 8, 8, 8])
    s = PKBatchSampler(labels, 2, 2, seed=9, with_draws=True)
    s.set_epoch(3)
    whole = list(s)
    s.set_epoch(3, start_batch=2)
    assert list(s) == whole[2:] and len(s) == len(whole) - 2


def test_draw_numbers_count_earlier_draws_in_the_epoch():
    labels = _labels([3, 1, 5])
    s = PKBatchSampler(labels, 2, 4, seed=0, with_draws=True)
    plain = PKBatchSampler(labels, 2, 4, seed=0)
    keyed = list(s)
    assert [[i for i, _ in b] for b in keyed] == list(plain)
    count = Counter()
    for b in keyed:
        for i, draw in b:  # slow: the draw number is how often i came before
            assert draw == count[i]
            count[i] += 1
    batches = [np.array([3, 1, 3]), np.array([1, 1])]
    assert [d.tolist() for d in draw_numbers(batches)] == [[0, 0, 1], [1, 2]]


def test_batches_per_epoch_is_ceil():
    assert batches_per_epoch(1120, 4, 4) == 70
    assert batches_per_epoch(1121, 4, 4) == 71
    assert batches_per_epoch(16, 4, 4) == 1
