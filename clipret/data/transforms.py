"""Image transforms: the backbone's own eval preprocessing, and training augmentation.

Evaluation uses open_clip's ``image_transform`` with the size, mean, std,
interpolation and resize mode stored in the model spec, so embeddings see
exactly the preprocessing the backbone was trained with (not ImageNet's).
Training without the random crop resizes and crops with those same steps, so
a ``squash`` or ``longest`` model sees the same geometry in training as in
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


SMALL_INPUT = 128  # px: below this, the seed's strong augmentation is scaled down (see resolve_augmentation)


@dataclass
class AugmentConfig:
    """Training augmentation, as resolved for one run (see :func:`resolve_augmentation`)."""

    crop: bool = True  # random resized crop, area scale (crop_scale, 1); off: the model's eval resize (and crop)
    flip: bool = True  # horizontal flip, p=0.5
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 = off
    grayscale: float = 0.1  # probability; 0 = off
    erasing: float = 0.25  # random erasing probability; 0 = off
    crop_scale: float = 0.5  # smallest crop area, as a fraction of the image


def resolve_augmentation(size: int, grayscale_images: bool, *, crop: bool | None = None, flip: bool = True,
                         color_jitter: float | None = None, grayscale: float | None = None,
                         erasing: float | None = None, crop_scale: float = 0.5) -> AugmentConfig:
    """The augmentation of a run: each setting as given, or (``None``) chosen from the input
    ``size`` (px) and whether the training images are all gray (``grayscale_images``).

    * CLIP-sized inputs (>= 128 px) keep the strong default: crop of area 0.5-1, colour jitter
      0.2, random grayscale 0.1, random erasing 0.25.
    * Small inputs (< 128 px) get the flip only: no random crop and no erasing. On Fashion-MNIST at
      32 px even a mild crop (area 0.8-1) cost 0.07 MAP@R in a 12-epoch budget, and the seed's
      strong set far more (docs/benchmarks.md, "Training recipe").
    * On gray images colour jitter and random grayscale are off: saturation and hue do nothing
      there, and brightness/contrast changes measured no gain.
    """
    small = size < SMALL_INPUT
    return AugmentConfig(
        crop=not small if crop is None else crop,
        flip=flip,
        color_jitter=(0.0 if grayscale_images else 0.2) if color_jitter is None else color_jitter,
        grayscale=(0.0 if grayscale_images else 0.1) if grayscale is None else grayscale,
        erasing=(0.0 if small else 0.25) if erasing is None else erasing,
        crop_scale=crop_scale,
    )


def eval_transform(preprocess: dict[str, Any]) -> Callable:
    """PIL image -> (3, H, W) float tensor, as the backbone expects."""
    import open_clip

    return open_clip.image_transform(
        preprocess["size"],
        is_train=False,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        resize_mode=preprocess.get("resize_mode", "shortest"),
        interpolation=preprocess.get("interpolation", "bicubic"),
        fill_color=preprocess.get("fill_color", 0),
    )


def eval_geometry(preprocess: dict[str, Any]) -> list[Callable]:
    """The resize and crop steps of :func:`eval_transform` (PIL -> PIL, at the model's input size),
    following its ``resize_mode``: shortest side + centre crop, longest side + pad, or squash."""
    return geometry_steps(eval_transform(preprocess))


def geometry_steps(transform: Any) -> list[Callable]:
    """The resize and crop steps (PIL -> PIL) of an ``open_clip.image_transform(..., is_train=False)``.

    They are recognised by their classes (``ResizeKeepRatio`` and ``CenterCropOrPad`` from
    ``open_clip.transform``, torchvision's ``Resize`` and ``CenterCrop``), and carry the model's
    ``resize_mode`` at its input size; the steps after them only convert and normalise.
    A transform without such a step is a ValueError.
    """
    from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
    from torchvision.transforms import CenterCrop, Resize

    steps = [s for s in transform.transforms if isinstance(s, (Resize, CenterCrop, ResizeKeepRatio, CenterCropOrPad))]
    if not steps:
        raise ValueError(f"no resize step found in open_clip's eval transform {transform}")
    return steps


def train_transform(preprocess: dict[str, Any], aug: AugmentConfig) -> Callable:
    """PIL image -> augmented (3, H, W) tensor with the backbone's normalisation."""
    from torchvision import transforms as T

    size = preprocess["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interp = T.InterpolationMode.BICUBIC if preprocess.get("interpolation", "bicubic") == "bicubic" else T.InterpolationMode.BILINEAR
    steps: list[Any] = []
    if aug.crop:
        steps.append(T.RandomResizedCrop(size, scale=(aug.crop_scale, 1.0), interpolation=interp))
    else:
        steps += eval_geometry(preprocess)
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        s = aug.color_jitter
        steps.append(T.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    if aug.grayscale > 0:
        steps.append(T.RandomGrayscale(p=aug.grayscale))
    steps += [T.ToTensor(), T.Normalize(tuple(preprocess["mean"]), tuple(preprocess["std"]))]
    if aug.erasing > 0:
        steps.append(T.RandomErasing(p=aug.erasing, value="random"))
    return T.Compose(steps)
