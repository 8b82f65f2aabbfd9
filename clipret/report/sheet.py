"""The contact sheet: one PNG, one row per query (the report's rows, worst first), made with PIL.

Each row is the query's thumbnail, a gap, then its list; a hit has a green border, a miss a
red one, the query's own item a grey one, as in the HTML report. A missing image is a grey
tile with a cross. Every cell is ``thumb + 2 * BORDER`` pixels square, so the sheet is
``(1 + k) * cell + GAP`` wide and ``rows * cell`` high (k: the longest list shown).
"""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageOps

from clipret.report.data import Item, ReportData
from clipret.report.page import HIT_COLOUR, MISS_COLOUR, SELF_COLOUR
from clipret.report.thumbs import Thumbs

__all__ = ["BORDER", "GAP", "sheet_size", "contact_sheet", "write_sheet"]

BORDER, GAP = 4, 12
_COLOURS = {"hit": HIT_COLOUR, "miss": MISS_COLOUR, "self": SELF_COLOUR, "": "#ffffff", "query": "#333333"}


def sheet_size(n_rows: int, k: int, thumb: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``n_rows`` rows of a query and ``k`` items."""
    cell = thumb + 2 * BORDER
    return (1 + k) * cell + GAP, max(1, n_rows) * cell


def _tile(thumbs: Thumbs, item: Item, status: str) -> Image.Image:
    """A cell: the thumbnail scaled to fit ``thumbs.size`` (small images scaled up), framed in the status colour."""
    size = thumbs.size
    tile = Image.new("RGB", (size + 2 * BORDER, size + 2 * BORDER), "#ffffff")
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, size + 2 * BORDER - 1, size + 2 * BORDER - 1], outline=_COLOURS[status], width=BORDER)
    img, _ = thumbs.get(item.key, item.path)
    if img is None:
        inner = [BORDER, BORDER, BORDER + size - 1, BORDER + size - 1]
        draw.rectangle(inner, fill="#dddddd")
        draw.line(inner, fill="#999999", width=2)
        draw.line([inner[0], inner[3], inner[2], inner[1]], fill="#999999", width=2)
        return tile
    img = ImageOps.contain(img, (size, size), Image.Resampling.BICUBIC)
    tile.paste(img, (BORDER + (size - img.width) // 2, BORDER + (size - img.height) // 2))
    return tile


def contact_sheet(data: ReportData, thumbs: Thumbs) -> Image.Image:
    """The RGB sheet of ``data.rows`` (see :func:`sheet_size`), thumbnails from ``thumbs``; each
    query's AP is written on it."""
    thumb = thumbs.size
    k = max((len(r.items) for r in data.rows), default=0)
    cell = thumb + 2 * BORDER
    sheet = Image.new("RGB", sheet_size(len(data.rows), k, thumb), "#ffffff")
    draw = ImageDraw.Draw(sheet)
    for y, row in enumerate(data.rows):
        top = y * cell
        sheet.paste(_tile(thumbs, row.query, "query"), (0, top))
        if row.ap is not None:
            draw.rectangle([BORDER, top + BORDER, BORDER + 52, top + BORDER + 12], fill="#000000")
            draw.text((BORDER + 2, top + BORDER), f"AP {row.ap:.2f}", fill="#ffffff")
        for x, item in enumerate(row.items):
            sheet.paste(_tile(thumbs, item, item.status), (GAP + (1 + x) * cell, top))
    return sheet


def write_sheet(data: ReportData, out: str | os.PathLike[str], thumbs: Thumbs) -> None:
    """Write the contact sheet of ``data`` to ``out`` (PNG), atomically."""
    from clipret.artifacts.atomic import atomic_open

    image = contact_sheet(data, thumbs)
    with atomic_open(out, "wb") as fh:
        image.save(fh, format="PNG", optimize=True)
