"""The shard plan of ``clipret embed``: which ids form a shard, which rank embeds which shards.

Pure functions over counts, no I/O. A shard is a contiguous run of ``shard_size`` ids (the
last one shorter); it is the unit written to ``OUT.parts/``, the unit ``--resume`` skips, and
the unit ranks share under torchrun. The shard bounds depend only on the number of ids and
the shard size, never on the world size, so a run resumed with another number of ranks
reuses every finished shard.
"""

from __future__ import annotations

from collections.abc import Sequence

AUTO_SHARDS = 256  # the automatic shard size aims at about this many shards ...
SHARD_STEP = 256  # ... in multiples of this many ids (the default GPU batch) ...
MAX_SHARD = 8192  # ... and at most this many ids per shard


def auto_shard_size(n_ids: int) -> int:
    """Ids per shard when ``--shard-size`` is not given: about ``n_ids / 256``, rounded up to a
    multiple of 256, between 256 and 8192.

    Enough shards to keep every rank of a large job busy with small imbalance (a rank waits at
    most one shard for the slowest), few enough that the files stay a small overhead.
    """
    want = -(-max(n_ids, 1) // AUTO_SHARDS)
    return min(MAX_SHARD, max(SHARD_STEP, -(-want // SHARD_STEP) * SHARD_STEP))


def shard_bounds(n_ids: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: shard ``n`` covers ids ``start <= i < stop``, in id order."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, n_ids)) for start in range(0, n_ids, shard_size)]


def split_contiguous(n_items: int, world_size: int, rank: int) -> range:
    """The block of ``range(n_items)`` that ``rank`` of ``world_size`` takes.

    Blocks are contiguous, in rank order, cover every item once, and differ in length by at
    most one (the first ``n_items % world_size`` ranks take one more).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard_batches(bounds: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of id positions for the given shards, in order: each shard is cut into
    ``batch_size`` runs from its own start, so no batch spans two shards, and a shard is embedded
    in the same batches whichever rank, run or world size embeds it (bit-identical rows).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [list(range(b, min(b + batch_size, stop))) for start, stop in bounds for b in range(start, stop, batch_size)]
