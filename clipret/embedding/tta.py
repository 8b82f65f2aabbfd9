"""Test-time augmentation (TTA): several views of each image, one embedding.

``--tta flip`` embeds each image and its horizontal flip; ``--tta flip,scales``
adds two zoomed views (1.15× and 0.87×): the image is resized as the model's
own preprocessing resizes it (its ``resize_mode``: ``shortest``, ``longest``
or ``squash``), times the scale, then centre-cropped or padded (with the
model's fill colour) to the model's exact input size, so every view stacks.
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

from collections.abc import Callable, Sequence
from typing import Any

import torch

TTA_CHOICES = ("flip", "flip,scales")
SCALES = (1.15, 0.87)
RESIZE_MODES = ("shortest", "longest", "squash")  # open_clip's PreprocessCfg.resize_mode values


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


def _hw(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """The model's input size as (H, W): an int is square, a pair is (H, W) as open_clip reads it."""
    if isinstance(size, int):
        return size, size
    h, w = (int(x) for x in size)
    return h, w


def scaled_size(img_hw: tuple[int, int], size: tuple[int, int], mode: str, scale: float) -> int | list[int]:
    """The size for torchvision's ``resize`` before the crop: the model's own resize for ``mode``, times ``scale``.

    ``img_hw`` and ``size`` are (H, W) in pixels. At scale 1 this is what open_clip's eval
    transform resizes to: ``shortest`` on a square input is ``Resize(int)`` (an int: the
    short side), ``shortest`` on a non-square input and ``longest`` are open_clip's
    ``ResizeKeepRatio`` (both sides rounded), ``squash`` is the input size itself.
    """
    (ih, iw), (h, w) = img_hw, size
    if mode == "squash":
        return [max(1, round(h * scale)), max(1, round(w * scale))]
    if mode == "shortest" and h == w:
        return max(1, round(h * scale))
    ratio_h, ratio_w = ih / (h * scale), iw / (w * scale)
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return [max(1, round(ih / ratio)), max(1, round(iw / ratio))]


def crop_or_pad(img: Any, size: tuple[int, int], fill: int | tuple[int, ...]) -> Any:
    """Centre crop of a PIL image to (H, W), padding with ``fill`` first where it is smaller (as open_clip pads)."""
    from torchvision.transforms import functional as F

    (h, w), (iw, ih) = size, img.size
    if h > ih or w > iw:
        dw, dh = max(0, w - iw), max(0, h - ih)
        img = F.pad(img, [dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2], fill=fill)
    return F.center_crop(img, [h, w])


class ScaledView:
    """PIL image -> (3, H, W): the model's eval transform of the image zoomed by ``scale`` about its centre.

    The zoom is done here (resize as the model's ``resize_mode`` does, times ``scale``, then
    centre crop or pad to the input size); the result is then an (H, W) image, on which the
    model's own transform only converts and normalises (its resizes and crops are no-ops at
    the input size). At scale 1 the view equals the model's plain preprocessing.
    """

    def __init__(self, base: Callable, preprocess: dict[str, Any], scale: float) -> None:
        from torchvision.transforms import InterpolationMode

        self.base, self.scale = base, float(scale)
        self.size = _hw(preprocess["size"])
        self.mode = preprocess.get("resize_mode") or "shortest"
        if self.mode not in RESIZE_MODES:
            from clipret.errors import ClipretError

            raise ClipretError(f"--tta scales does not know resize_mode {self.mode!r} (known: "
                               f"{', '.join(RESIZE_MODES)}); use --tta flip with this model")
        bilinear = preprocess.get("interpolation") == "bilinear"
        if self.mode == "shortest" and self.size[0] != self.size[1]:
            bilinear = False  # open_clip's ResizeKeepRatio for a non-square input ignores the setting
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        fill = preprocess.get("fill_color", 0)
        self.fill = tuple(fill) if isinstance(fill, (list, tuple)) else int(fill)

    def __call__(self, img: Any) -> torch.Tensor:
        from torchvision.transforms import functional as F

        hw = scaled_size((img.size[1], img.size[0]), self.size, self.mode, self.scale)
        img = F.resize(img, hw, interpolation=self.interpolation, antialias=True)
        return self.base(crop_or_pad(img, self.size, self.fill))


class TTAViews:
    """PIL image -> (V, 3, H, W): the plain view, its flip, then the extra scales (if asked).

    ``scaled`` holds one :class:`ScaledView` per extra scale (empty without ``flip,scales``).
    """

    def __init__(self, base: Callable, tta: str | None, scaled: Sequence[Callable] = ()) -> None:
        self.base = base
        self.tta = tta
        self.scaled = list(scaled)

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
    scaled = [ScaledView(base, preprocess, s) for s in SCALES] if tta == "flip,scales" else []
    return TTAViews(base, tta, scaled)


def average_views(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, V, D) view embeddings -> (B, D): their mean, L2-normalised."""
    return torch.nn.functional.normalize(embeddings.float().mean(dim=1), dim=-1)
