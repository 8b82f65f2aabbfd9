"""AdamW parameter groups with layer-wise LR decay (LLRD) and no decay on 1-D params.

Depth of a parameter of a ViT with L blocks (``tower.visual``):

    conv1, class/positional embedding, ln_pre     depth 0   lr = base * d**L
    transformer.resblocks.i                        depth i+1 lr = base * d**(L-1-i)
    ln_post (above the top block)                  depth L   lr = base

so the top block gets the base LR and each block below it ``d`` times less.
For a ModifiedResNet the stem is depth 0 and layer1..layer4 are depth 1..4.
The pooling and head get ``base * head_lr_mult``.

No weight decay for biases, norm weights, the GeM ``p`` and any other
parameter with fewer than 2 dimensions (the class embedding too).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_VIT_BLOCK = re.compile(r"^tower\.visual\.transformer\.resblocks\.(\d+)\.")
_RN_STAGE = re.compile(r"^tower\.visual\.layer(\d)\.")


def layer_depth(name: str, num_blocks: int) -> int | None:
    """Depth of a tower parameter (0 = embeddings ... num_blocks = top); None for head/pool."""
    if not name.startswith("tower."):
        return None
    if m := _VIT_BLOCK.match(name):
        return int(m.group(1)) + 1
    if m := _RN_STAGE.match(name):
        return int(m.group(1))
    if name.startswith("tower.visual.ln_post"):
        return num_blocks
    return 0


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    llrd: float = 0.65,
    head_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Param groups for ``torch.optim.AdamW`` (a :class:`RetrievalNet`-shaped model).

    Each group carries ``lr``, ``weight_decay`` and, for inspection,
    ``name`` and ``lr_scale``. Frozen parameters are left out.
    """
    num_blocks = int(getattr(getattr(model, "tower", None), "num_blocks", 0))
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_depth(name, num_blocks)
        if depth is None:
            key, scale = "head", head_lr_mult
        else:
            key, scale = f"depth{depth:02d}", llrd ** (num_blocks - depth)
        decay = param.ndim >= 2
        group = groups.setdefault(
            (key, decay),
            {
                "name": f"{key}.{'decay' if decay else 'no_decay'}",
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def current_lrs(optimizer: Any) -> tuple[float, float]:
    """(base LR, head LR) of an optimiser built on :func:`param_groups`, as the schedule stands now.

    The base LR is the one a group with ``lr_scale == 1`` has (the top block);
    every group shares the schedule's multiplier, so it is any group's
    ``lr / lr_scale``. The head LR is the head group's (base LR if none).
    """
    groups = optimizer.param_groups
    base = next((g["lr"] / g["lr_scale"] for g in groups if g["lr_scale"] > 0), 0.0)
    head = next((g["lr"] for g in groups if g["name"].startswith("head.")), base)
    return float(base), float(head)
