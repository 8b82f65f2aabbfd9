"""Pooling of token or feature-map features into one vector per image.

Functions first (pure tensor math), Modules second (they hold the learnable
GeM exponent and call the functions).

Layout convention: features are (B, N, C): batch, tokens (ViT patches or the
H*W cells of a CNN map), channels. Pooling reduces dim 1.

GeM on ViT tokens needs care. open_clip's patch tokens come out of a
LayerNorm: about half of each token's values are negative. The classic
``clamp(min=eps)`` maps them all to eps, so they carry no signal and no
gradient. :class:`GeM` can map its input to non-negative values in one of
three ways:

* ``"clamp"``: the classic GeM (and right for post-ReLU CNN maps);
* ``"softplus"``: ``softplus(x)``, smooth, every value keeps a gradient;
* ``"shift"``: ``x - min_n(x) + eps`` per image and channel, order-preserving.

docs/gem.md records the measurement behind the ViT default: on random-init
tiny ViTs no remedy beat ``clamp``, so it stays the default until a
measurement with pretrained weights says otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipret.config import GEM_INPUTS

__all__ = ["GEM_INPUTS", "GeM", "MeanPool", "clamp_min_recoverable", "gem", "nonnegative"]


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float = 1e-6, dim: int = 1) -> torch.Tensor:
    """Generalised mean ``(mean_n x^p)^(1/p)`` over ``dim``; ``x`` must be non-negative.

    Computed in the log domain, ``exp((logsumexp_n(p log x) - log N) / p)``: the same value, but
    finite with a finite gradient for any p. The direct form underflows in float32 once ``eps^p``
    does (p > ~7.5 for eps 1e-6, e.g. a channel whose tokens are all negative before the clamp): the
    mean becomes 0 and the gradient of ``0^(1/p)`` is NaN, which then spreads to every weight.

    Args:
        x: (B, N, C) non-negative features (values below ``eps`` are clamped to it).
        p: the exponent, a scalar tensor or float; p=1 is the mean, p→∞ the max.
    Returns:
        (B, C).
    """
    n = x.shape[dim]
    return ((p * x.clamp(min=eps).log()).logsumexp(dim=dim) - math.log(n)).div(p).exp()


def nonnegative(x: torch.Tensor, how: str, eps: float = 1e-6) -> torch.Tensor:
    """Map (B, N, C) features to non-negative values for GeM (see the module docstring)."""
    if how == "clamp":
        return x.clamp(min=eps)
    if how == "softplus":
        return F.softplus(x)
    if how == "shift":
        return x - x.amin(dim=1, keepdim=True).detach() + eps
    raise ValueError(f"unknown GeM input mapping {how!r}; choose from {GEM_INPUTS}")


class _ClampMinRecoverable(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, low: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.low = low
        return x.clamp(min=low)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * ((x >= ctx.low) | (grad < 0)), None  # grad < 0: a descent step raises x


def clamp_min_recoverable(x: torch.Tensor, low: float) -> torch.Tensor:
    """``max(x, low)``, with a gradient that lets ``x`` climb back once it has fallen below ``low``.

    The forward is ``x.clamp(min=low)``. Where ``x >= low`` the gradient is clamp's (1). Below it,
    clamp's is 0, so a gradient step can never raise ``x`` again; here the gradient passes
    (straight through) when it points up (negative: descent raises ``x``) and stays 0 when it
    points further down, so ``x`` does not drift off while it has no effect.
    """
    return _ClampMinRecoverable.apply(x, low)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (initialised at 3).

    Input (B, N, C), output (B, C). The forward uses ``max(p, 1)``, as it always has; a ``p`` that
    fell below 1 keeps the gradient that raises it (:func:`clamp_min_recoverable`). The parameter
    is still ``p`` itself, so checkpoints of any clipret version load unchanged.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, input_map: str = "clamp") -> None:
        super().__init__()
        if input_map not in GEM_INPUTS:
            raise ValueError(f"unknown GeM input mapping {input_map!r}; choose from {GEM_INPUTS}")
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.input_map = input_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nonnegative(x.float(), self.input_map, self.eps)
        return gem(x, clamp_min_recoverable(self.p, 1.0), self.eps, dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}, input_map={self.input_map!r}"


class MeanPool(nn.Module):
    """Average over tokens: (B, N, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)
