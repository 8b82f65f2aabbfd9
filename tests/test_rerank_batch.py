"""Re-ranking distance blocks for full-ranking evaluation: exact, and memory-bounded at the default block size."""

import tracemalloc

import numpy as np
import pytest
from test_rerank import clustered

from clipret.evaluation.stream import chunk_rows
from clipret.retrieval.rerank import prepare_rerank
from clipret.retrieval.rerank.batch import final_distance, original_distance

BLOCK_BYTES = 4 * 2**20  # DEFAULT_BLOCK_BYTES (512 MiB) scaled down so the test stays small


def slow_block(batch, a, b):
    """The obvious version: a dense (b - a, G) overlap, then final_distance over whole arrays."""
    g = batch.n_gallery
    acc = np.zeros((b - a) * g, dtype=np.float32)
    batch._overlap(a, b, acc)
    original = original_distance(batch.query[a:b] @ batch.gallery.T, batch.max_dist[a:b, None])
    return final_distance(acc.reshape(b - a, g), original, batch.lam)


@pytest.fixture(scope="module")
def batch():
    query, gallery = clustered(600, 2000, 16, seed=40, per=10)
    return prepare_rerank(query, gallery, k=10)


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_default_sized_block_peaks_below_two_blocks(batch):
    """evaluate --rerank asks for chunk_rows(G) rows, one block of the byte budget; the call holds about one."""
    rows = chunk_rows(batch.n_gallery, BLOCK_BYTES)
    assert rows < batch.query.shape[0]
    block, peak = _peak(lambda: batch.distance_block(0, rows))
    assert block.shape == (rows, batch.n_gallery) and block.nbytes <= BLOCK_BYTES
    assert peak <= 1.5 * BLOCK_BYTES, f"peak {peak / 2**20:.1f} MiB for a {BLOCK_BYTES / 2**20:.0f} MiB block"
    buf = np.empty_like(block)
    again, extra = _peak(lambda: batch.distance_block(0, rows, out=buf))
    assert again is buf and extra <= 0.5 * BLOCK_BYTES  # reusing the caller's buffer: only the scratch
    np.testing.assert_array_equal(again, block)
    np.testing.assert_allclose(block, slow_block(batch, 0, rows), atol=1e-6, rtol=0)


def test_blocks_at_any_boundaries_equal_the_obvious_version(batch):
    for a, b in [(0, 1), (3, 70), (500, 600)]:
        np.testing.assert_allclose(batch.distance_block(a, b), slow_block(batch, a, b), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="C-contiguous"):
        batch.distance_block(0, 4, out=np.empty((4, batch.n_gallery), np.float64))
