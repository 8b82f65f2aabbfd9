"""The embedding head: Linear (no bias) -> BatchNorm1d (optional) -> Dropout, then L2-normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Project pooled (B, in_dim) features to (B, out_dim) unit vectors."""

    def __init__(self, in_dim: int, out_dim: int = 512, dropout: float = 0.1, bn: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) float32, each row of unit L2 norm."""
        x = self.drop(self.bn(self.fc(x.float())))
        return F.normalize(x, dim=-1)
