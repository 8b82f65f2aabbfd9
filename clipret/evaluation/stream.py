"""Full-ranking metrics streamed over query chunks, in bounded memory.

The scores of one chunk of queries against the whole gallery, an (n, G)
block, come from a pluggable *score function* (:mod:`clipret.retrieval.scores`); the
default is a matmul against a (possibly memory-mapped) gallery, read once per chunk. Each row is
reduced at once to the ranks of its relevant items (:class:`RankCounter`,
no sort of the row) and those to per-query metric values; nothing of size
Q x G is ever held, and no index array is built for a whole gallery row.

Peak memory is about: the score block (``max_block_bytes``), plus ~21 bytes
per gallery item per worker thread, plus the gallery pages the OS keeps
mapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clipret.evaluation.ranks import RankCounter
from clipret.metrics import first_hit_rank, per_query_metrics, summarize
from clipret.retrieval.scores import ScoreFn
from clipret.runtime import available_cpus

__all__ = ["DEFAULT_BLOCK_BYTES", "chunk_rows", "score_chunks", "evaluate_scores"]

DEFAULT_BLOCK_BYTES = 512 * 2**20
_HITS_PER_BATCH = 1 << 20  # rank arrays gathered before they are reduced to metrics


def chunk_rows(n_gallery: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES, itemsize: int = 4) -> int:
    """Query rows per chunk so that an (rows, G) score block fits ``max_block_bytes`` (at least 1)."""
    return max(1, int(max_block_bytes) // (itemsize * max(1, int(n_gallery))))


def score_chunks(score_fn: ScoreFn, query_codes: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (scores (n, G), query label codes (n,)) for consecutive chunks of ``rows`` queries."""
    for q0 in range(0, len(query_codes), rows):
        q1 = min(q0 + rows, len(query_codes))
        yield score_fn(q0, q1), query_codes[q0:q1]


def evaluate_scores(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    gallery_codes: np.ndarray,
    ks: Sequence[int],
    *,
    exclude: np.ndarray | None = None,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    return_per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Full-ranking metrics from score blocks, one chunk of queries at a time.

    chunks: (scores (n, G) float32/float64, higher is better, finite;
    query label codes (n,) int) pairs, e.g. from :func:`score_chunks`. A block may be a torch
    tensor (on a GPU): its ranks are then counted on its device
    (:func:`clipret.evaluation.device_ranks.block_ranks`) and only they come back.
    gallery_codes: (G,) int label codes, in the same code space as the
    queries' (see :func:`clipret.metrics.encode_labels`). ks: cut-offs.
    exclude: (Q,) int64 over all the queries in chunk order, the gallery row
    of each query's own item or -1 (:mod:`clipret.retrieval.selfmatch`): that
    row is left out of the query's ranking and of its R, as if it were not in
    the gallery (its score in the block is overwritten with -inf).
    workers: threads that count ranks (default: the CPUs this process may use).
    on_progress: called with the number of queries finished after each chunk.

    Returns what :func:`clipret.metrics.evaluate_full` returns for the same
    ranking (ties -> lower gallery index), without ever sorting a row.
    ``return_per_query``: return ``(summary, per_query)``, the (Q,) values the means are taken
    over plus ``n_relevant`` and ``first_hit_rank``, as :func:`clipret.metrics.evaluate_topk` does.
    """
    gallery_codes = np.asarray(gallery_codes)
    if gallery_codes.ndim != 1 or gallery_codes.size == 0 or gallery_codes.dtype.kind not in "iu" or gallery_codes.min() < 0:
        raise ValueError(f"gallery_codes must be a non-empty (G,) array of ints >= 0, got {gallery_codes.dtype} {gallery_codes.shape}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > gallery_codes.size:
        raise ValueError(f"every k must be in [1, {gallery_codes.size}], got {ks}")
    members = _Members(gallery_codes)
    workers = max(1, int(workers or available_cpus()))
    counters = [RankCounter(gallery_codes.size) for _ in range(workers)]
    values: list[dict[str, np.ndarray]] = []
    n_relevant: list[np.ndarray] = []

    def run(part: int, block: np.ndarray, codes: np.ndarray, own: np.ndarray | None, lo: int, hi: int) -> list:
        out, ranks, r, held = [], [], [], 0
        for i in range(lo, hi):
            relevant, row = members.of(int(codes[i])), block[i]
            if own is not None and own[i] >= 0:  # the query's own item: last in the ranking, and not relevant
                row = row if row.flags.writeable else row.copy()
                row[own[i]] = -np.inf
                relevant = relevant[relevant != own[i]]
            ranks.append(np.sort(counters[part].ranks(row, relevant)) + 1)
            r.append(relevant.size)
            held += relevant.size
            if held >= _HITS_PER_BATCH or i == hi - 1:
                out.append(_per_query(np.concatenate(ranks), np.asarray(r, dtype=np.int64), ks))
                ranks, r, held = [], [], 0
        return out

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    done = 0
    on_device: list = []  # DeviceMembers, made at the first torch block
    try:
        for block, codes in chunks:
            codes = np.asarray(codes)
            block = block if _is_tensor(block) else np.asarray(block)
            if block.ndim != 2 or tuple(block.shape) != (codes.shape[0], gallery_codes.size):
                raise ValueError(f"a score block must be ({codes.shape[0]}, {gallery_codes.size}), got {tuple(block.shape)}")
            if codes.size == 0:
                continue
            own = None if exclude is None else np.asarray(exclude, dtype=np.int64)[done : done + codes.size]
            if own is not None and own.shape != codes.shape:
                raise ValueError(f"exclude must hold one gallery row (or -1) per query; it ends before query {done + codes.size}")
            done += codes.size
            if _is_tensor(block):  # counted where the block is (a GPU): only the ranks come back
                from clipret.evaluation.device_ranks import DeviceMembers, block_rank_parts

                if not on_device:
                    on_device.append(DeviceMembers(gallery_codes, block.device))
                parts = [[v for hits, r in block_rank_parts(block, codes, on_device[0], own) for v in _sliced(hits, r, ks)]]
            else:
                cuts = np.linspace(0, codes.size, min(workers, codes.size) + 1).astype(int)
                jobs = [(p, block, codes, own, int(a), int(b)) for p, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
                parts = list(pool.map(lambda j: run(*j), jobs)) if pool else [run(*jobs[0])]
            for part in parts:
                for v, r in part:
                    values.append(v)
                    n_relevant.append(r)
            if on_progress is not None:
                on_progress(int(codes.size))
    finally:
        if pool is not None:
            pool.shutdown()
    if not values:
        raise ValueError("no query to evaluate")
    merged = {name: np.concatenate([v[name] for v in values]) for name in values[0]}
    first = merged.pop("first_hit_rank")
    summary = summarize(merged, np.concatenate(n_relevant))
    if not return_per_query:
        return summary
    return summary, {**merged, "n_relevant": np.concatenate(n_relevant), "first_hit_rank": first}


def _is_tensor(block: object) -> bool:
    """A torch tensor (told apart without importing torch)."""
    return type(block).__module__.partition(".")[0] == "torch"


def _sliced(hits: np.ndarray, n_rel: np.ndarray, ks: list[int]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """:func:`_per_query` over runs of whole queries holding about ``_HITS_PER_BATCH`` ranks each
    (one query may hold more), so that its temporaries stay bounded."""
    ends = np.cumsum(n_rel)
    out, q0 = [], 0
    while q0 < n_rel.size:
        start = int(ends[q0 - 1]) if q0 else 0
        q1 = min(n_rel.size, max(q0 + 1, int(np.searchsorted(ends, start + _HITS_PER_BATCH, side="right"))))
        out.append(_per_query(hits[start : int(ends[q1 - 1])], n_rel[q0:q1], ks))
        q0 = q1
    return out


def _per_query(hits: np.ndarray, n_rel: np.ndarray, ks: list[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(sum R,) 1-based ranks, ascending within each query; (n,) R per query -> per-query values, R."""
    offsets = np.zeros(n_rel.size + 1, dtype=np.int64)
    np.cumsum(n_rel, out=offsets[1:])
    values = per_query_metrics(hits, offsets, n_rel, ks, full=True)
    values["first_hit_rank"] = first_hit_rank(hits, offsets)  # int64; taken out before the means
    return values, n_rel


class _Members:
    """Gallery indices of each label code, ascending: (R,) int64 views into one array."""

    def __init__(self, codes: np.ndarray) -> None:
        self._order = np.argsort(codes, kind="stable").astype(np.int64)
        self._starts = np.zeros(int(codes.max()) + 2, dtype=np.int64)
        np.cumsum(np.bincount(codes, minlength=self._starts.size - 1), out=self._starts[1:])

    def of(self, code: int) -> np.ndarray:
        if not 0 <= code < self._starts.size - 1:
            return self._order[:0]
        return self._order[self._starts[code] : self._starts[code + 1]]

