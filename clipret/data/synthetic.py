"""A small procedurally drawn dataset for smoke tests, demos and benchmarks.

Each class is a shape (circle, square, ...) filled with a texture (solid,
stripes, ...), e.g. ``star_checker``. Every image draws its background, its
two foreground colours, position, scale, aspect and rotation at random, so
colour says nothing about the class: a model has to look at shape and texture.

    ROOT/training/<class>/t_0000.png
    ROOT/test/query/<class>/q_0000.png
    ROOT/test/gallery/<class>/g_0000.png
    ROOT/test/labels.csv            filename,label  (ids relative to query/ or gallery/)

Only numpy and Pillow are used; each image has its own generator seeded from
``(seed, class, split, index)``, so the output is byte-identical for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipret.data.layout import ensure_empty_targets, write_labels_csv
from clipret.errors import ClipretError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker", "grid")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_SPLITS = {"training": 0, "query": 1, "gallery": 2}
_SUPERSAMPLE = 3  # the shape mask is drawn this much larger, then box-filtered down
_NOISE_SIGMA = 8.0  # gaussian pixel noise, in 0..255 units


def class_names(n_classes: int) -> list[str]:
    """The first ``n_classes`` shape_texture names, spread so every shape and texture appears early."""
    if not 2 <= n_classes <= MAX_CLASSES:
        raise ClipretError(f"n_classes must be between 2 and {MAX_CLASSES}, got {n_classes}")
    ns = len(SHAPES)
    # Class i is shape i % ns with texture shifted by i // ns: all pairs are distinct.
    return [f"{SHAPES[i % ns]}_{TEXTURES[(i % ns + i // ns) % len(TEXTURES)]}" for i in range(n_classes)]


def _ngon(n: int, radius: float | np.ndarray, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * np.reshape(radius, (-1, 1))


def _outline(shape: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Unit-radius polygon, an optional hole polygon, and the hole's offset."""
    none = np.zeros(2)
    if shape == "square":
        return _ngon(4, 1.0, np.pi / 4), None, none
    if shape == "triangle":
        return _ngon(3, 1.0, -np.pi / 2), None, none
    if shape == "star":
        return _ngon(10, np.tile([1.0, 0.45], 5), -np.pi / 2), None, none
    if shape == "cross":
        w = 0.34
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return np.array(pts, dtype=float), None, none
    if shape == "ring":
        return _ngon(48, 1.0), _ngon(48, 0.58), none
    if shape == "crescent":
        return _ngon(48, 1.0), _ngon(48, 0.85), np.array([0.5, 0.0])
    return _ngon(48, 1.0), None, none  # circle


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float alpha mask in [0, 1] of one randomly placed, scaled and rotated shape."""
    radius = rng.uniform(0.24, 0.40) * size
    aspect = rng.uniform(0.8, 1.2)
    angle = rng.uniform(0, 2 * np.pi)
    margin = 0.85 * radius
    centre = rng.uniform(margin, size - margin, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = np.array([aspect, 1.0 / aspect]) * radius

    def place(pts: np.ndarray, offset: np.ndarray) -> list[tuple[float, float]]:
        xy = ((pts + offset) * scale) @ rot.T + centre
        return [tuple(p) for p in (xy * _SUPERSAMPLE).tolist()]

    outer, hole, offset = _outline(shape)
    big = Image.new("L", (size * _SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(big)
    draw.polygon(place(outer, np.zeros(2)), fill=255)
    if hole is not None:
        draw.polygon(place(hole, offset), fill=0)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 pattern choosing between the two foreground colours."""
    if texture == "solid":
        return np.ones((size, size), dtype=np.float32)
    period = rng.uniform(size / 9, size / 5.5)
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, period, size=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (x * np.cos(angle) + y * np.sin(angle) + phase[0]) % period
    v = (-x * np.sin(angle) + y * np.cos(angle) + phase[1]) % period
    if texture == "stripes":
        on = u < period / 2
    elif texture == "dots":
        on = (u - period / 2) ** 2 + (v - period / 2) ** 2 < (0.3 * period) ** 2
    elif texture == "checker":
        on = (u < period / 2) ^ (v < period / 2)
    else:  # grid
        on = (u < 0.28 * period) | (v < 0.28 * period)
    return on.astype(np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background and two foreground colours, uniform in RGB but far enough apart to see."""
    while True:
        bg, fg, fg2 = rng.uniform(0, 255, size=(3, 3))
        if np.linalg.norm(fg - bg) > 110 and np.linalg.norm(fg2 - fg) > 110 and np.linalg.norm(fg2 - bg) > 60:
            return bg, fg, fg2


def draw_image(class_name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``class_name`` (``shape_texture``)."""
    shape, texture = class_name.split("_", 1)
    bg, fg, fg2 = _colours(rng)
    alpha = _shape_mask(shape, size, rng)[..., None]
    pattern = _texture(texture, size, rng)[..., None]
    fill = pattern * fg + (1 - pattern) * fg2
    img = (1 - alpha) * bg + alpha * fill
    img += _NOISE_SIGMA * rng.standard_normal(size=img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def make_synthetic_dataset(
    root: Path,
    *,
    n_classes: int = 12,
    train_per_class: int = 24,
    query_per_class: int = 4,
    gallery_per_class: int = 12,
    image_size: int = 64,
    seed: int = 0,
) -> dict:
    """Draw the dataset under ``root`` and return a summary of what was written."""
    root = Path(root)
    classes = class_names(n_classes)
    counts = {"training": train_per_class, "query": query_per_class, "gallery": gallery_per_class}
    for split, n in counts.items():
        if n < 1:
            raise ClipretError(f"{split} images per class must be at least 1, got {n}")
    if seed < 0:
        raise ClipretError(f"seed must be a non-negative integer, got {seed}")
    if image_size < 16:
        raise ClipretError(f"image_size must be at least 16 pixels, got {image_size}")
    ensure_empty_targets(root)
    folders = {"training": root / "training", "query": root / "test" / "query", "gallery": root / "test" / "gallery"}
    prefix = {"training": "t", "query": "q", "gallery": "g"}
    label_rows: list[tuple[str, str]] = []
    for split, n in counts.items():
        for c, name in enumerate(classes):
            folder = folders[split] / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, c, _SPLITS[split], i])
                file_name = f"{prefix[split]}_{i:04d}.png"
                draw_image(name, image_size, rng).save(folder / file_name, compress_level=1)
                if split != "training":
                    label_rows.append((f"{name}/{file_name}", name))
    write_labels_csv(root / "test" / "labels.csv", label_rows)
    return {
        "root": str(root),
        "classes": classes,
        "n_train": n_classes * train_per_class,
        "n_query": n_classes * query_per_class,
        "n_gallery": n_classes * gallery_per_class,
    }
