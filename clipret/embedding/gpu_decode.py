"""Decode JPEG batches on the GPU (nvJPEG) and preprocess them there; PIL for everything else.

With the device path, loader workers only read bytes: :class:`EncodedImages` returns a file's
raw bytes when it is a plain JPEG nvJPEG can take (:func:`plain_jpeg`), and the PIL item of
:class:`~clipret.data.dataset.ImageFolderDataset` otherwise (other formats, CMYK, EXIF-rotated,
Adobe or truncated JPEGs, anything over the pixel limit, any file that cannot be read). In the
main process, :meth:`DevicePlan.finish` decodes the batch's JPEGs with one
``torchvision.io.decode_jpeg(list, device=...)`` call, then resizes, crops (or pads) and
normalises them on the device with the model's own eval geometry. A batch nvJPEG refuses is
decoded file by file, and a file it refuses goes through the PIL path, so a bad file is skipped
and reported exactly as it is without the device path, never a crash.

Which path (:func:`device_decode_plan`): the device path when the device is CUDA, the
transform is the model's eval transform (optionally with ``--tta flip``), and nvJPEG decodes a
probe image there. ``CLIPRET_GPU_DECODE=0`` or ``1`` (or the ``choice`` argument) forces it
off or on; forced on for the CPU device, torchvision decodes with libjpeg in the main process
(a test and comparison mode, slower than PIL in workers). A full, exact decode (``decode_side``
None: ``--exact-decode``) always keeps the PIL path.

Numerics: the device path decodes at full size and resizes with torch's antialiased bicubic
(or bilinear) filter, in one float pass rounded to uint8 once; PIL decodes at a reduced DCT
scale (``draft``) and rounds between its two passes. Pixels differ by a fraction of a level on
average (up to ~8 levels at hard edges when upscaling); embeddings keep a cosine of at least
0.999 to the PIL path's (tests/test_gpu_paths.py, bench/embed.py --steady prints it).
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from clipret.data import decode
from clipret.data.dataset import ImageFolderDataset
from clipret.data.layout import id_to_path
from clipret.errors import ClipretError

__all__ = ["DECODE_CHOICES", "ENV", "decode_choice", "DevicePlan", "EncodedImages", "collate_encoded", "device_decode_plan", "plain_jpeg", "wanted"]

ENV = "CLIPRET_GPU_DECODE"
_ORIENTATION = 0x0112  # EXIF tag


DECODE_CHOICES = ("auto", "gpu", "pil")  # --decode


def decode_choice(decode: str | None) -> bool | None:
    """``--decode`` -> the ``choice`` of :func:`wanted`: ``auto`` (or None) -> None, ``gpu`` -> True, ``pil`` -> False."""
    if decode is None or decode == "auto":
        return None
    if decode not in DECODE_CHOICES:
        raise ClipretError(f"--decode takes {', '.join(DECODE_CHOICES)}, got {decode!r}")
    return decode == "gpu"


def wanted(device: Any, *, exact: bool = False, choice: bool | None = None) -> bool | None:
    """Whether to decode JPEGs on ``device``: False with ``exact``; else ``choice`` if given, else
    ``CLIPRET_GPU_DECODE`` (0/1); else None: automatic (yes on CUDA when nvJPEG works)."""
    if exact:
        return False
    if choice is not None:
        return bool(choice)
    value = os.environ.get(ENV, "").strip().lower()
    if value in {"", "auto"}:
        return None if torch.device(device).type == "cuda" else False
    if value in {"0", "1"}:
        return value == "1"
    raise ClipretError(f"{ENV}={value!r} is not understood; set it to 0 (PIL), 1 (device decode) or auto")


def device_decode_plan(transform: Callable, device: Any, *, exact: bool = False,
                       choice: bool | None = None) -> DevicePlan | None:
    """The :class:`DevicePlan` that replaces ``transform`` on ``device``, or None for the PIL path
    (see the module docstring for the rule). Forcing it on for a transform it cannot reproduce
    (``--tta flip,scales``, a training transform) is a :class:`ClipretError`."""
    want = wanted(device, exact=exact, choice=choice)
    if want is False:
        return None
    plan = DevicePlan.of(transform)
    if plan is None and want:
        raise ClipretError(f"{ENV}=1 but this transform has no device version (--tta flip,scales?); "
                           f"set {ENV}=0 or auto")
    if plan is not None and want is None and not nvjpeg_works(str(torch.device(device))):
        return None
    return plan


@functools.lru_cache(maxsize=None)
def nvjpeg_works(device: str) -> bool:
    """Whether ``decode_jpeg`` decodes a small probe JPEG on ``device`` (checked once per device)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buf, format="JPEG")
    try:
        out = _decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
    except Exception:  # noqa: BLE001 - any failure means: not on this device
        return False
    return tuple(out[0].shape) == (3, 8, 16)


def plain_jpeg(data: bytes) -> bool:
    """True for a complete baseline/progressive JPEG in RGB (YCbCr) or grayscale that nvJPEG and PIL
    decode alike: no EXIF rotation, no Adobe marker (CMYK, RGB-coded), under the pixel limit, and
    ending in its EOI marker (a truncated file goes to PIL, which reports it)."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG" or img.mode not in {"RGB", "L"} or "adobe" in img.info:
                return False
            if img.width * img.height > decode.MAX_PIXELS:
                return False
            return img.getexif().get(_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 - anything odd: the PIL path decides
        return False


class EncodedImages(Dataset):
    """Items ``{"jpeg": (L,) uint8 bytes or None, "image", "index", "error"}``: the raw bytes of a
    plain JPEG (:func:`plain_jpeg`), else ``pil``'s item (a decoded tensor, or None and a reason)."""

    def __init__(self, pil: ImageFolderDataset) -> None:
        self.pil = pil

    def __len__(self) -> int:
        return len(self.pil)

    def __getitem__(self, key: int) -> dict[str, Any]:
        index = int(key[0] if isinstance(key, (tuple, list)) else key)
        try:
            data = id_to_path(self.pil.folder, self.pil.ids[index]).read_bytes()
        except (OSError, ValueError):
            data = b""
        if plain_jpeg(data):
            return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "image": None, "index": index, "error": ""}
        return {"jpeg": None, **self.pil[index]}


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"images": (B', ...) PIL-path tensors or None, "indices": (B',) long, "jpegs": [(L,) uint8],
    "jpeg_indices": [int], "errors": [(i, reason)]}``."""
    decoded = [it for it in items if it["jpeg"] is None and it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in decoded]) if decoded else None,
        "indices": torch.tensor([it["index"] for it in decoded], dtype=torch.long),
        "jpegs": [it["jpeg"] for it in items if it["jpeg"] is not None],
        "jpeg_indices": [it["index"] for it in items if it["jpeg"] is not None],
        "errors": [(it["index"], it["error"]) for it in items if it["jpeg"] is None and it["image"] is None],
    }


def _decode(jpegs: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def decode_all(jpegs: Sequence[torch.Tensor], device: Any) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 images on ``device``, one per encoded JPEG; one batched call, and file by file
    if it fails; None where a file fails alone."""
    dev = str(torch.device(device))
    if not jpegs:
        return []
    try:
        return list(_decode(list(jpegs), dev))
    except Exception:  # noqa: BLE001 - nvJPEG refused the batch: find the file(s) it refuses
        out: list[torch.Tensor | None] = []
        for data in jpegs:
            try:
                out.append(_decode([data], dev)[0])
            except Exception:  # noqa: BLE001 - this file goes through the PIL path
                out.append(None)
        return out


@dataclass(frozen=True)
class DevicePlan:
    """The model's eval preprocessing on (3, h, w) uint8 tensors on any device.

    ``geometry``: its resize and crop/pad steps (torchvision ``Resize``/``CenterCrop``, open_clip
    ``ResizeKeepRatio``/``CenterCropOrPad``), applied to uint8 tensors; then /255 and
    ``(x - mean) / std``. ``flip``: also the mirrored view (``--tta flip``), giving (B, 2, 3, H, W).
    """

    geometry: tuple[Any, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False

    @classmethod
    def of(cls, transform: Callable) -> DevicePlan | None:
        """The plan of an open_clip eval transform (or :class:`~clipret.embedding.tta.TTAViews` of one
        with ``flip`` only); None for anything else."""
        from torchvision.transforms import Compose, Normalize

        from clipret.data.transforms import geometry_steps
        from clipret.embedding.tta import TTAViews

        flip = isinstance(transform, TTAViews)
        if flip and (transform.tta != "flip" or transform.scaled):
            return None
        base = transform.base if flip else transform
        if not isinstance(base, Compose):
            return None
        try:
            geometry = tuple(geometry_steps(base))
        except ValueError:
            return None
        norm = [s for s in base.transforms if isinstance(s, Normalize)]
        passive = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb"}
        rest = [s for s in base.transforms if s not in geometry and not isinstance(s, Normalize)]
        if len(norm) != 1 or any(getattr(s, "__name__", type(s).__name__) not in passive for s in rest):
            return None
        return cls(geometry, tuple(float(m) for m in norm[0].mean), tuple(float(s) for s in norm[0].std), flip)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, h_i, w_i) uint8 images on one device -> (B, 3, H, W) float32 (or (B, 2, 3, H, W) with
        ``flip``), in order; images of the same size are resized together."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for members in groups.values():
            x = torch.stack([images[i] for i in members])
            for step in self.geometry:
                x = _apply(step, x)
            for j, i in enumerate(members):
                out[i] = x[j]
        x = torch.stack(out).float().div_(255.0)  # type: ignore[arg-type]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
        return torch.stack([x, torch.flip(x, dims=[-1])], dim=1) if self.flip else x

    def finish(self, batch: dict[str, Any], device: Any, fallback: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """A :func:`collate_encoded` batch -> ``{"images": (B', ...) on device or None, "indices": (B',)
        long, "errors": [(i, reason)]}`` in index order, as the PIL path gives it. A JPEG the device
        does not decode goes through ``fallback(i)`` (the PIL dataset's item)."""
        rows: list[tuple[int, torch.Tensor]] = []
        errors = list(batch["errors"])
        if batch["images"] is not None:
            cpu = batch["images"].to(device, non_blocking=True)
            rows += list(zip(batch["indices"].tolist(), cpu))
        decoded = decode_all(batch["jpegs"], device)
        good = [(i, img) for i, img in zip(batch["jpeg_indices"], decoded) if img is not None]
        if good:
            rows += list(zip([i for i, _ in good], self([img for _, img in good])))
        for i, img in zip(batch["jpeg_indices"], decoded):
            if img is None:
                item = fallback(i)
                if item["image"] is None:
                    errors.append((i, item["error"]))
                else:
                    rows.append((i, item["image"].to(device)))
        rows.sort(key=lambda r: r[0])
        return {"images": torch.stack([r[1] for r in rows]) if rows else None,
                "indices": torch.tensor([r[0] for r in rows], dtype=torch.long),
                "errors": sorted(errors)}


def _apply(step: Any, x: torch.Tensor) -> torch.Tensor:
    """One geometry step on (B, 3, h, w) uint8: torchvision's steps take tensors as they are;
    open_clip's ``ResizeKeepRatio`` reads a PIL size, so its target size is computed here."""
    if type(step).__name__ == "ResizeKeepRatio":
        from torchvision.transforms import functional as F

        h, w = x.shape[-2:]
        th, tw = step.size
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) * step.longest + min(ratio_h, ratio_w) * (1.0 - step.longest)
        return F.resize(x, [round(h / ratio), round(w / ratio)], step.interpolation, antialias=True)
    return step(x)
