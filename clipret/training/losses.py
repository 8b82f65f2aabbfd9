"""Loss and miner, from pytorch-metric-learning; under DDP they see every rank's embeddings."""

from __future__ import annotations

from typing import Any

import torch

from clipret import runtime
from clipret.config import LOSSES
from clipret.errors import ClipretError
from clipret.parallel import groups


class Objective:
    """The training loss (Circle by default), with a MultiSimilarity miner switched on from a
    given epoch (1-based).

    ``loss``: ``circle`` (``CircleLoss(m, gamma)``), ``multisimilarity``
    (``MultiSimilarityLoss()``, pytorch-metric-learning's defaults) or ``arcface``
    (``ArcFaceLoss(num_classes, embed_dim)``, a classification loss with one learned (D,) proxy
    per class: it takes no mined pairs, so the miner stays off, and its proxies are trained in
    the head's parameter group, see :meth:`parameters`).

    Under DDP (an active process group of W > 1 ranks when the objective is built), the pair
    losses and the miner go through pytorch-metric-learning's ``DistributedLossWrapper`` and
    ``DistributedMinerWrapper``: each rank all-gathers every rank's (B, D) embeddings and
    labels, its own rows first, and mines and computes the loss over the whole (W*B, D)
    batch. The value is the loss of the concatenated batch, the same on every rank. Only the
    rank's own rows carry gradient (``all_gather`` is not differentiable), so each rank gets
    ``dL/d(own rows)``; the wrapper multiplies the loss by W, and DDP's average of the W
    ranks' parameter gradients is then exactly ``dL/d(parameters)`` of the whole batch.
    ArcFace is a mean over rows, so each rank takes its own rows' mean and DDP's average of
    the model gradients is the whole batch's; :meth:`sync_grads` averages the proxies'
    gradients the same way.
    """

    def __init__(self, m: float = 0.4, gamma: float = 32.0, miner_epsilon: float = 0.1, mine_from_epoch: int = 5, *,
                 loss: str = "circle", num_classes: int = 0, embed_dim: int = 0) -> None:
        from pytorch_metric_learning import losses, miners

        if loss not in LOSSES:
            raise ClipretError(f"unknown --loss {loss!r}; use {', '.join(LOSSES)}")
        self.kind = loss
        if loss == "circle":
            self.loss = losses.CircleLoss(m=m, gamma=gamma)
        elif loss == "multisimilarity":
            self.loss = losses.MultiSimilarityLoss()
        else:
            self.loss = losses.ArcFaceLoss(num_classes=num_classes, embedding_size=embed_dim)
        self.miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon)
        self.mine_from_epoch = mine_from_epoch
        self.world_size = runtime.world_size() if groups.active() else 1
        # what the loss returned for backward is, times the loss of the step's whole batch
        self.scale = self.world_size if loss != "arcface" else 1

    def parameters(self) -> list[torch.nn.Parameter]:
        """The loss's own trainable parameters (ArcFace's (D, C) class proxies; none for pair losses)."""
        return list(self.loss.parameters())

    def to(self, device: Any) -> Objective:
        self.loss.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state)

    def mining(self, epoch: int) -> bool:
        """``epoch`` is 0-based here; mining starts at 1-based epoch ``mine_from_epoch`` (never for ArcFace)."""
        return self.kind != "arcface" and epoch + 1 >= self.mine_from_epoch

    def sync_grads(self) -> None:
        """Average the loss parameters' gradients over the ranks (after backward; no-op with one rank)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for param in self.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world_size

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, D) unit embeddings, (B,) int labels -> (scalar loss to backpropagate, info).

        The returned loss is :attr:`scale` times the loss of the step's batch (divide by it to
        report it): W times the gathered batch's for pair losses with W ranks, this rank's
        rows' for ArcFace, and the loss itself with one process.
        """
        embeddings = embeddings.float()
        loss_fn, miner = self.loss, self.miner
        if self.world_size > 1 and self.kind != "arcface":
            from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

            loss_fn, miner = DistributedLossWrapper(self.loss), DistributedMinerWrapper(self.miner)
        if self.mining(epoch):
            pairs = miner(embeddings, labels)
            return loss_fn(embeddings, labels, pairs), {"mined_pairs": int(pairs[0].numel() + pairs[2].numel())}
        return loss_fn(embeddings, labels), {}
