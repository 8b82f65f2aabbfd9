"""The two image encoders clipret embeds with.

* :class:`RetrievalNet`: token tower -> pooling -> :class:`EmbeddingHead`;
  what ``clipret train`` fine-tunes.
* :class:`ClipImageEncoder`: CLIP's own image embedding (CLS + projection),
  no head: the zero-shot baseline.

Both map (B, 3, H, W) normalised images to (B, D) float32 unit vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipret.config import POOLS
from clipret.model.head import EmbeddingHead
from clipret.model.pooling import GeM, MeanPool
from clipret.model.tower import TokenTower

__all__ = ["POOLS", "ClipImageEncoder", "RetrievalNet"]


class RetrievalNet(nn.Module):
    def __init__(
        self,
        tower: TokenTower,
        pool: str = "gem",
        embed_dim: int = 512,
        dropout: float = 0.1,
        gem_input: str = "clamp",
        head_bn: bool = True,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; choose from {POOLS}")
        if pool == "cls" and tower.kind != "vit":
            raise ValueError("--pool cls needs a ViT backbone; use gem or mean for CNNs")
        self.tower = tower
        self.pool_kind = pool
        # CNN maps are post-ReLU, so the classic clamp is the right GeM input there.
        self.pool = GeM(input_map=gem_input if tower.kind == "vit" else "clamp") if pool == "gem" else MeanPool()
        self.head = EmbeddingHead(tower.width, embed_dim, dropout, bn=head_bn)

    @property
    def embed_dim(self) -> int:
        return self.head.fc.out_features

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) pooled tower features, before the head."""
        cls, tokens = self.tower(images)
        if self.pool_kind == "cls":
            return cls
        return self.pool(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) unit vectors."""
        return self.head(self.pooled(images))


class ClipImageEncoder(nn.Module):
    """CLIP's own image embedding, L2-normalised: (B, 3, H, W) -> (B, embed_dim)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images).float(), dim=-1)
