"""Turn an open_clip image tower into token features for our own pooling.

open_clip's towers end in their own pooling and projection (CLS token +
``proj`` for ViTs, attention pooling for ModifiedResNet). For retrieval
fine-tuning we take the features just before that:

* ViT: every token after the transformer and ``ln_post``, split into the
  CLS token (B, C) and the patch tokens (B, N, C);
* ModifiedResNet: the ``layer4`` map, flattened to (B, H*W, C), no CLS.

The unused CLIP projection / attention pool is dropped, so it neither
takes optimizer state nor shows up in saved weights.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenTower(nn.Module):
    """Wrap an open_clip visual module; ``forward`` returns ``(cls or None, tokens)``.

    Attributes:
        kind: "vit" or "cnn".
        width: C, the channel count of the returned features.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        name = type(visual).__name__
        if name == "VisionTransformer":
            if getattr(visual, "attn_pool", None) is not None:
                raise ValueError("towers with attentional pooling (CoCa) are not supported; pick a plain ViT")
            self.kind = "vit"
            self.width = int(visual.class_embedding.shape[0])
            visual.proj = None
        elif name == "ModifiedResNet":
            self.kind = "cnn"
            self.width = int(visual.attnpool.c_proj.in_features)
            visual.attnpool = nn.Identity()
        else:
            raise ValueError(f"image tower {name} is not supported for fine-tuning; use a ViT or RN model")
        self.visual = visual

    @property
    def num_blocks(self) -> int:
        """Depth used by layer-wise LR decay: transformer blocks, or ResNet stages."""
        if self.kind == "vit":
            return len(self.visual.transformer.resblocks)
        return 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, 3, H, W) images -> (cls (B, C) or None, tokens (B, N, C))."""
        v = self.visual
        if self.kind == "cnn":
            x = x.to(v.conv1.weight.dtype)
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
            return None, x.flatten(2).transpose(1, 2)
        x = v.conv1(x)  # (B, C, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.ln_post(v.transformer(x))
        return x[:, 0], x[:, 1:]
