"""Open any image file as an RGB PIL image, or say precisely why not.

Real folders hold broken files. :func:`load_rgb` never raises for a bad
image: it returns ``(None, reason)``, and the caller lists the reason in the
manifest. Valid but unusual files are normalised:

* EXIF orientation is applied;
* animated GIF/WebP: the first frame;
* palette and transparent images are composited on white;
* CMYK, grayscale and 16-bit images are converted to 8-bit RGB;
* a file whose extension lies (a PNG named .jpg) is read by its content.

Decompression bombs are refused. The pixel limit is set explicitly here
(``MAX_PIXELS``, overridable with the CLIPRET_MAX_IMAGE_PIXELS environment
variable), not left to PIL's default.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipret.errors import first_line

DEFAULT_MAX_PIXELS = 178_956_970  # about 13k x 13k, 3x PIL's own default
MAX_PIXELS = int(os.environ.get("CLIPRET_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS))

# Explicit, not by accident: a truncated file is an error, and the bomb limit is ours.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images over the limit are refused by load_rgb's own check; PIL's warning for them is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


DRAFT_MARGIN = 2  # fast decoding keeps both sides >= this many times the model's input side


def decode_side_for(input_size: int | list[int] | tuple[int, ...], exact: bool = False) -> int | None:
    """The ``min_side`` for :func:`load_rgb` given the model's input size; None (full decode) when ``exact``."""
    if exact:
        return None
    side = input_size if isinstance(input_size, int) else max(input_size)
    return int(side) * DRAFT_MARGIN


def set_max_pixels(limit: int) -> None:
    """Change the decompression-bomb limit (pixels per image) for this process."""
    global MAX_PIXELS
    MAX_PIXELS = int(limit)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr8 = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(path: str | os.PathLike[str], min_side: int | None = None) -> tuple[Image.Image | None, str | None]:
    """Decode ``path`` into an RGB image.

    Returns ``(image, None)`` on success and ``(None, reason)`` otherwise,
    where ``reason`` is a short human-readable phrase.

    ``min_side``: a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8,
    done by libjpeg in the DCT, PIL's ``draft``) as long as both sides stay at
    least ``min_side`` pixels; other formats decode at full size. The caller
    then resizes to the model input as usual. ``None`` decodes at full size.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return None, "broken symlink"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, f"cannot stat file ({exc.strerror or exc})"
    if size == 0:
        return None, "empty file (0 bytes)"
    return decode_rgb(path, min_side)


def load_rgb_bytes(data: bytes, min_side: int | None = None) -> tuple[Image.Image | None, str | None]:
    """:func:`load_rgb` of an image file's bytes (an upload), with the same checks and reasons."""
    if not data:
        return None, "empty file (0 bytes)"
    return decode_rgb(io.BytesIO(data), min_side)


def decode_rgb(source: Path | BinaryIO, min_side: int | None = None) -> tuple[Image.Image | None, str | None]:
    """The decoding half of :func:`load_rgb`: ``source`` (a path or a binary file object) -> (RGB image, None),
    or (None, reason). The decompression-bomb guard, ``draft`` for JPEGs, first frame, EXIF rotation."""
    opened = None
    try:
        opened = img = Image.open(source)
        # Our own check, before any pixel is decoded: PIL only *warns* between 1x and 2x the
        # limit, and turning that warning into an error with catch_warnings() is not
        # thread-safe (check_images decodes in threads).
        if img.width * img.height > MAX_PIXELS:
            raise Image.DecompressionBombError("image too large")
        if min_side and img.format == "JPEG":
            img.draft(img.mode, (int(min_side), int(min_side)))
        img.seek(0)  # animated: first frame
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no orientation tag
        rgb = _to_rgb(img)
        if rgb is opened and getattr(opened, "fp", None) is not None:
            rgb = rgb.copy()  # the file is still open (several frames): detach before closing it
        elif rgb is opened:
            opened = None  # single frame: load() closed the file already, and close() would free the pixels
        return rgb, None
    except PermissionError:
        return None, "permission denied"
    except Image.DecompressionBombError:
        return None, f"decompression bomb refused (over {MAX_PIXELS} pixels)"
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = first_line(exc)
        if "truncated" in detail.lower():
            return None, "truncated image"
        return None, f"corrupt image ({detail})"
    finally:
        if opened is not None:
            opened.close()
