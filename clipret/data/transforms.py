"""Image transforms: the backbone's own eval preprocessing, and training augmentation.

Evaluation uses open_clip's ``image_transform`` with the size, mean, std,
interpolation and resize mode stored in the model spec, so embeddings see
exactly the preprocessing the backbone was trained with (not ImageNet's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class AugmentConfig:
    """Training augmentation switches; each can be turned off from the CLI."""

    crop: bool = True  # random resized crop, scale (0.5, 1)
    flip: bool = True  # horizontal flip, p=0.5
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 = off
    grayscale: float = 0.1  # probability; 0 = off
    erasing: float = 0.25  # random erasing probability; 0 = off


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


def train_transform(preprocess: dict[str, Any], aug: AugmentConfig) -> Callable:
    """PIL image -> augmented (3, H, W) tensor with the backbone's normalisation."""
    from torchvision import transforms as T

    size = preprocess["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interp = T.InterpolationMode.BICUBIC if preprocess.get("interpolation", "bicubic") == "bicubic" else T.InterpolationMode.BILINEAR
    steps: list[Any] = []
    if aug.crop:
        steps.append(T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp))
    else:
        steps += [T.Resize(min(size), interpolation=interp), T.CenterCrop(size)]
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
