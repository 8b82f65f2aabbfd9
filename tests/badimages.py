"""A fixture factory: one small file per kind of broken or unusual image.

:func:`write_bad_images` writes every case into a flat folder and returns
``{filename: expected}``, where ``expected`` is ``None`` for a valid file that
must load, or a substring of the skip reason :func:`clipret.data.decode.load_rgb`
must give. Everything is generated here with PIL/numpy; nothing is downloaded.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
BOMB_SIDE = 30_000  # 9e8 pixels: more than twice the default limit, so PIL raises (not just warns)

# Valid files and what load_rgb must return for them: (width, height) after EXIF rotation.
VALID_SIZES: dict[str, tuple[int, int]] = {
    "png_named_jpg.jpg": (24, 16),
    "cmyk.jpg": (24, 16),
    "gray16.png": (30, 20),
    "palette_transparent.png": (16, 16),
    "grayscale.png": (24, 16),
    "exif_rotated.jpg": (20, 40),  # stored 40x20 with orientation 6 (rotate 90° clockwise)
    "animated.gif": (16, 16),
    "animated.webp": (16, 16),
}

# Invalid files and a substring of their skip reason.
INVALID_REASONS: dict[str, str] = {
    "zero_bytes.jpg": "empty file",
    "truncated.jpg": "truncated",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
    "broken_link.jpg": "broken symlink",
}

# chmod 000: unreadable for a normal user, but root reads it anyway (it holds a valid JPEG).
UNREADABLE = "unreadable.jpg"
UNREADABLE_SIZE = (24, 16)


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def expected_outcomes() -> dict[str, str | None]:
    """What :func:`write_bad_images` returns, without writing anything."""
    out: dict[str, str | None] = {name: None for name in VALID_SIZES}
    out.update(INVALID_REASONS)
    out[UNREADABLE] = None if running_as_root() else "permission denied"
    return out


def expected_size(name: str) -> tuple[int, int]:
    return UNREADABLE_SIZE if name == UNREADABLE else VALID_SIZES[name]


def _noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=1)
def bomb_png_bytes(side: int = BOMB_SIDE) -> bytes:
    """A real, decodable 1-bit PNG of side x side black pixels, about 0.5 MB.

    Written chunk by chunk (the raw scanlines are ~112 MB but are never held in
    memory at once), so it takes a fraction of a second and a few MB.
    """
    row = 1 + (side + 7) // 8  # filter byte + packed bits
    rows_per_block = 1000
    block = bytes(row * rows_per_block)
    comp = zlib.compressobj(1)
    parts = []
    done = 0
    while done < side:
        n = min(rows_per_block, side - done)
        parts.append(comp.compress(block if n == rows_per_block else bytes(row * n)))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def write_bad_images(folder: Path) -> dict[str, str | None]:
    """Write every case into ``folder`` (flat); return {filename: None | reason substring}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # --- invalid
    (folder / "zero_bytes.jpg").write_bytes(b"")
    full = _jpeg_bytes(_noise_rgb(64, 64, seed=1))
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("this is not an image, just some text\n" * 4)
    (folder / "bomb.png").write_bytes(bomb_png_bytes())
    link = folder / "broken_link.jpg"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink("does-not-exist.png", link)

    # --- valid but unusual
    _noise_rgb(24, 16, seed=2).save(folder / "png_named_jpg.jpg", format="PNG")
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG", quality=95)  # red in CMYK
    Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)).save(folder / "gray16.png")  # mode I;16, mid-grey

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0] + [255, 0, 0] + [0] * (254 * 3))  # index 0 black (made transparent), 1 red
    pal.paste(1, (0, 0, 8, 16))  # left half red, right half transparent
    pal.save(folder / "palette_transparent.png", transparency=0)

    Image.fromarray(np.tile(np.arange(24, dtype=np.uint8) * 10, (16, 1)), mode="L").save(folder / "grayscale.png")

    rot = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    rot.save(folder / "exif_rotated.jpg", format="JPEG", exif=exif)

    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)

    # --- unreadable (permission); root can still read it
    unreadable = folder / UNREADABLE
    if unreadable.exists():
        unreadable.chmod(0o644)
    unreadable.write_bytes(_jpeg_bytes(_noise_rgb(*UNREADABLE_SIZE, seed=3)))
    unreadable.chmod(0)

    expected = expected_outcomes()
    written = {p.name for p in folder.iterdir()}
    assert set(expected) <= written, sorted(set(expected) - written)
    return expected


def write_normal_images(folder: Path, n: int = 3, size: tuple[int, int] = (32, 32)) -> list[str]:
    """A few ordinary RGB JPEG/PNG files; returns their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"normal_{i}.{'png' if i % 2 else 'jpg'}"
        _noise_rgb(*size, seed=100 + i).save(folder / name)
        names.append(name)
    return names
