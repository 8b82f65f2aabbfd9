"""Turn an open_clip image tower into token features for our own pooling.

open_clip's towers end in their own pooling and projection (CLS token +
``proj`` for ViTs, attention pooling for ModifiedResNet). For retrieval
fine-tuning we take the features just before that, from the tower's own
forward (see :mod:`clipret.model._open_clip`):

* ViT: open_clip's ``output_tokens`` output: the CLS token (B, C) and the
  patch tokens (B, N, C), after ``ln_post`` (also for CLIPA-style towers,
  whose own forward normalises only the pooled vector);
* ModifiedResNet: the ``layer4`` map, flattened to (B, H*W, C), no CLS.

The unused CLIP projection / attention pool is dropped, so it neither
takes optimizer state nor shows up in saved weights.
"""

from __future__ import annotations

import torch
from torch import nn

from clipret.model import _open_clip


class TokenTower(nn.Module):
    """Wrap an open_clip visual module; ``forward`` returns ``(cls or None, tokens)``.

    Attributes:
        kind: "vit" or "cnn".
        width: C, the channel count of the returned features.
        dropped: names (relative to ``visual``) of the removed CLIP head;
            pretrained weights for them are ignored.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.kind, self.width, self.dropped = _open_clip.strip_to_tokens(visual)
        self.visual = visual

    @property
    def num_blocks(self) -> int:
        """Depth used by layer-wise LR decay: transformer blocks, or ResNet stages."""
        if self.kind == "vit":
            return len(self.visual.transformer.resblocks)
        return 4

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Recompute each transformer block in the backward pass instead of keeping its activations.

        Uses open_clip's ``set_grad_checkpointing`` (``torch.utils.checkpoint``, non-reentrant),
        which :meth:`forward` goes through for every ViT block. Returns whether the tower
        supports it: open_clip's ModifiedResNet accepts the call and does nothing, so CNN towers
        return False.
        """
        self.visual.set_grad_checkpointing(enable)
        return self.kind == "vit"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, 3, H, W) images -> (cls (B, C) or None, tokens (B, N, C))."""
        return _open_clip.token_features(self.visual, self.kind, x)
