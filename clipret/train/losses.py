"""Loss and miner, from pytorch-metric-learning; under DDP they see every rank's embeddings."""

from __future__ import annotations

from typing import Any

import torch

from clipret import distributed, runtime


class CircleObjective:
    """Circle loss, with a MultiSimilarity miner switched on from a given epoch (1-based).

    Under DDP (an active process group of W > 1 ranks when the objective is built), the loss
    and the miner go through pytorch-metric-learning's ``DistributedLossWrapper`` and
    ``DistributedMinerWrapper``: each rank all-gathers every rank's (B, D) embeddings and
    labels, its own rows first, and mines and computes the loss over the whole (W*B, D)
    batch. The value is the loss of the concatenated batch, the same on every rank. Only the
    rank's own rows carry gradient (``all_gather`` is not differentiable), so each rank gets
    ``dL/d(own rows)``; the wrapper multiplies the loss by W, and DDP's average of the W
    ranks' parameter gradients is then exactly ``dL/d(parameters)`` of the whole batch.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, miner_epsilon: float = 0.1, mine_from_epoch: int = 5) -> None:
        from pytorch_metric_learning import losses, miners

        self.loss = losses.CircleLoss(m=m, gamma=gamma)
        self.miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon)
        self.mine_from_epoch = mine_from_epoch
        self.world_size = runtime.world_size() if distributed.active() else 1

    def mining(self, epoch: int) -> bool:
        """``epoch`` is 0-based here; mining starts at 1-based epoch ``mine_from_epoch``."""
        return epoch + 1 >= self.mine_from_epoch

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, D) unit embeddings, (B,) int labels -> (scalar loss to backpropagate, info).

        With W ranks the returned loss is W times the loss of the gathered batch (divide by
        :attr:`world_size` to report it); with one process it is the loss itself.
        """
        embeddings = embeddings.float()
        loss_fn, miner = self.loss, self.miner
        if self.world_size > 1:
            from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

            loss_fn, miner = DistributedLossWrapper(self.loss), DistributedMinerWrapper(self.miner)
        if self.mining(epoch):
            pairs = miner(embeddings, labels)
            return loss_fn(embeddings, labels, pairs), {"mined_pairs": int(pairs[0].numel() + pairs[2].numel())}
        return loss_fn(embeddings, labels), {}
