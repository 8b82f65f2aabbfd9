"""DistributedDataParallel for ``clipret train`` under torchrun.

One process per device, each a full copy of the model; DDP averages the gradients across
ranks in the backward pass, so every rank takes the same optimiser step and the weights stay
identical (rank 0's are written). What each rank computes:

* its own P×K batch of the shared epoch plan (:class:`clipret.data.sampler.PKBatchSampler`);
* the forward of that batch: the head's BatchNorm normalises over the rank's own P×K rows
  (plain BatchNorm, not SyncBatchNorm: see README, "Several GPUs", for why);
* the loss and the miner over every rank's embeddings (:class:`clipret.training.losses.Objective`),
  so the gradient is that of the loss of the whole P×K×world-size batch.

With one process everything here is a no-op.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clipret.parallel import groups

__all__ = ["rank_seed", "sync_buffers", "wrap"]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP when a process group of more than one rank is active, else ``model``.

    DDP copies rank 0's parameters and buffers to every rank here, and (its default) rank 0's
    buffers, BatchNorm running statistics, again before each training forward.
    """
    if not groups.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers to every rank.

    DDP sends them at the start of each training forward, so after a step the other ranks
    hold running statistics updated by their own last batch; validation embeds with rank 0's,
    the ones the exported model has.
    """
    if not groups.active():
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of rank ``rank`` > 0 (dropout masks differ between ranks); ``seed`` for rank 0,
    so rank 0 draws what a single process draws."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
