"""Test-time augmentation (TTA): several views of each image, one embedding.

``--tta flip`` embeds each image and its horizontal flip; ``--tta flip,scales``
adds two more scales of the short side (1.15× and 0.87×, resized then
centre-cropped to the model's input; the smaller one is padded with black).
The view embeddings are averaged and re-normalised.

TTA must be *symmetric*: the gallery and the queries are embedded with the
same views (``clipret embed --tta`` and ``clipret query --tta``), and the
manifest records which views were used so a mismatch is reported.

Every view is built from one decode of the image: :class:`TTAViews` is a
transform that maps one PIL image to a ``(V, 3, H, W)`` stack, and the flip
view is the mirrored tensor of the plain view (the mirror image of the same
crop), so the cost is V forward passes, not V decodes. ``--batch-size``
counts images, so a batch runs V times as many forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TTA_CHOICES = ("flip", "flip,scales")
SCALES = (1.15, 0.87)


def parse_tta(spec: str | None) -> str | None:
    """Normalise a ``--tta`` value: None/"none" -> None, "flip", "flip,scales" (order and spaces ignored)."""
    if spec is None or spec.strip().lower() in {"", "none", "off"}:
        return None
    parts = sorted({p.strip().lower() for p in spec.split(",") if p.strip()})
    norm = ",".join(p for p in ("flip", "scales") if p in parts)
    if norm not in TTA_CHOICES or len(parts) != len(norm.split(",")):
        from clipret.errors import ClipretError

        raise ClipretError(f"unknown --tta {spec!r}; use flip or flip,scales")
    return norm


def n_views(tta: str | None) -> int:
    """Forward passes per image: 1, 2 (flip) or 4 (flip,scales)."""
    return {None: 1, "flip": 2, "flip,scales": 4}[tta]


def _scaled(base: Any, size: int, scale: float) -> Callable:
    """The base eval transform with its resize changed to ``round(size * scale)`` before the centre crop."""
    from torchvision import transforms as T

    steps = list(base.transforms)
    crop = next(i for i, t in enumerate(steps) if isinstance(t, T.CenterCrop))
    resize = steps[crop - 1] if crop > 0 and isinstance(steps[crop - 1], T.Resize) else None
    interp = resize.interpolation if resize is not None else T.InterpolationMode.BICUBIC
    head = [T.Resize(max(1, round(size * scale)), interpolation=interp, antialias=True), T.CenterCrop(size)]
    return T.Compose(head + steps[crop + 1 :])


class TTAViews:
    """PIL image -> (V, 3, H, W): the plain view, its flip, then the extra scales (if asked)."""

    def __init__(self, base: Any, size: int, tta: str | None) -> None:
        self.base = base
        self.tta = tta
        self.scaled = [_scaled(base, size, s) for s in SCALES] if tta == "flip,scales" else []

    def __call__(self, img: Any) -> torch.Tensor:
        plain = self.base(img)
        views = [plain]
        if self.tta is not None:
            views.append(torch.flip(plain, dims=[-1]))
        views += [t(img) for t in self.scaled]
        return torch.stack(views)


def tta_transform(preprocess: dict[str, Any], tta: str | None) -> Callable:
    """The eval transform for ``preprocess``; with TTA, one that returns a (V, 3, H, W) stack."""
    from clipret.data.transforms import eval_transform

    base = eval_transform(preprocess)
    if tta is None:
        return base
    size = preprocess["size"]
    return TTAViews(base, int(size if isinstance(size, int) else min(size)), tta)


def average_views(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, V, D) view embeddings -> (B, D): their mean, L2-normalised."""
    return torch.nn.functional.normalize(embeddings.float().mean(dim=1), dim=-1)
