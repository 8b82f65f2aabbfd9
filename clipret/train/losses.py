"""Loss and miner, from pytorch-metric-learning."""

from __future__ import annotations

from typing import Any

import torch


class CircleObjective:
    """Circle loss, with a MultiSimilarity miner switched on from a given epoch (1-based)."""

    def __init__(self, m: float = 0.4, gamma: float = 80.0, miner_epsilon: float = 0.1, mine_from_epoch: int = 5) -> None:
        from pytorch_metric_learning import losses, miners

        self.loss = losses.CircleLoss(m=m, gamma=gamma)
        self.miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon)
        self.mine_from_epoch = mine_from_epoch

    def mining(self, epoch: int) -> bool:
        """``epoch`` is 0-based here; mining starts at 1-based epoch ``mine_from_epoch``."""
        return epoch + 1 >= self.mine_from_epoch

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, D) unit embeddings, (B,) int labels -> (scalar loss, info)."""
        embeddings = embeddings.float()
        if self.mining(epoch):
            pairs = self.miner(embeddings, labels)
            loss = self.loss(embeddings, labels, pairs)
            return loss, {"mined_pairs": int(pairs[0].numel() + pairs[2].numel())}
        return self.loss(embeddings, labels), {}
