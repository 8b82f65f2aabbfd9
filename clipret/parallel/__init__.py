"""The process-group layer at the bottom: torchrun ranks and how work is split among them.

* :mod:`~clipret.parallel.groups`: the process group (gloo or NCCL), collectives that are
  no-ops with one process, and how a rank stops when another fails;
* :mod:`~clipret.parallel.shards`: pure functions over counts: shard bounds, contiguous blocks
  per rank, batches within shards.

Nothing above this package names a backend: the rest of clipret calls these functions.
"""
