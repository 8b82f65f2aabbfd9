"""Training curves of a run folder: ``metrics.jsonl`` -> line charts as inline SVG, or a PNG (PIL).

``clipret train`` writes one row per epoch (:mod:`clipret.training.loop`): ``train_loss``,
``val_recall@1``, ``val_map@r`` (with held-out images), ``lr`` and ``head_lr`` (the base and
head learning rates), and an epoch-0 row scoring the starting weights. A key a row lacks, or a
value that is not a finite number, is skipped; a chart with no points is left out.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

from clipret.errors import ClipretError

__all__ = ["CHARTS", "COLOURS", "LOG_CHARTS", "read_metrics", "chart_series", "svg_chart", "png_charts"]

# chart title -> the metrics.jsonl keys drawn in it
CHARTS: dict[str, tuple[str, ...]] = {
    "training loss": ("train_loss",),
    "held-out retrieval": ("val_recall@1", "val_map@r"),
    "learning rate": ("lr", "head_lr"),
}
LOG_CHARTS = frozenset({"learning rate"})  # drawn on a log scale (when every value is positive)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
Series = dict[str, list[tuple[float, float]]]


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``run/metrics.jsonl``; ClipretError if the run or the file is missing or broken."""
    path = Path(run) / "metrics.jsonl"
    if not Path(run).is_dir():
        raise ClipretError(f"run folder not found: {run}")
    if not path.is_file():
        raise ClipretError(f"{run} holds no metrics.jsonl; pass a run folder written by `clipret train`")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ClipretError(f"{path}:{lineno} is not JSON ({exc.msg}); the file is damaged") from None
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        raise ClipretError(f"{path} holds no epochs yet; train for at least one epoch")
    return rows


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def chart_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """{chart title: {key: [(epoch, value), ...]}}: only keys with at least one point, only charts with a key."""
    out: dict[str, Series] = {}
    for title, keys in CHARTS.items():
        series = {key: [(float(r["epoch"]), v) for r in rows
                        if _number(r.get("epoch")) is not None and (v := _number(r.get(key))) is not None] for key in keys}
        series = {key: pts for key, pts in series.items() if pts}
        if series:
            out[title] = series
    return out


def _bounds(series: Series) -> tuple[float, float, float, float]:
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return x0, (x1 if x1 > x0 else x0 + 1), y0, (y1 if y1 > y0 else y0 + (abs(y0) or 1) * 0.1)


def _log_scale(title: str, series: Series) -> tuple[Series, bool]:
    """``series`` with log10 values when ``title`` is a log chart and every value is positive."""
    if title not in LOG_CHARTS or any(y <= 0 for pts in series.values() for _, y in pts):
        return series, False
    return {key: [(x, math.log10(y)) for x, y in pts] for key, pts in series.items()}, True


def _label(v: float, log: bool = False) -> str:
    return f"{10 ** v:.3g}" if log else f"{v:.3g}"


def svg_chart(title: str, series: Series, width: int = 480, height: int = 240) -> str:
    """One line chart as inline SVG markup: one ``<polyline>`` per series, axes with min/max, a legend."""
    left, right, top, bottom = 64, 12, 24, 30
    series, log = _log_scale(title, series)
    x0, x1, y0, y1 = _bounds(series)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="15" font-weight="bold">{escape(title)}{" (log scale)" if log else ""}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
             f'<text x="{left - 4}" y="{sy(y1) + 4:.1f}" text-anchor="end" font-size="11">{_label(y1, log)}</text>',
             f'<text x="{left - 4}" y="{sy(y0) + 4:.1f}" text-anchor="end" font-size="11">{_label(y0, log)}</text>',
             f'<text x="{left}" y="{height - 10}" font-size="11">epoch {_label(x0)}</text>',
             f'<text x="{width - right}" y="{height - 10}" text-anchor="end" font-size="11">{_label(x1)}</text>']
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline data-series="{escape(name)}" points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        parts.append(f'<text x="{width - right - 150}" y="{top + 14 * i + 4}" font-size="11" fill="{colour}">{escape(name)}</text>')
    return "".join(parts) + "</svg>"


def png_charts(charts: dict[str, Series], width: int = 480, height: int = 240) -> Any:
    """The same charts stacked in one RGB PIL image, ``width`` x ``height`` each."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height * max(1, len(charts))), "#ffffff")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, 12, 24, 30
    for c, (title, series) in enumerate(charts.items()):
        off = c * height
        series, log = _log_scale(title, series)
        x0, x1, y0, y1 = _bounds(series)

        def at(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    off + height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

        draw.text((left, off + 4), title + (" (log scale)" if log else ""), fill="#000000")
        draw.line([(left, off + top), (left, off + height - bottom), (width - right, off + height - bottom)], fill="#444444")
        draw.text((4, off + top - 6), _label(y1, log), fill="#000000")
        draw.text((4, off + height - bottom - 6), _label(y0, log), fill="#000000")
        draw.text((left, off + height - bottom + 6), f"epoch {_label(x0)} .. {_label(x1)}", fill="#000000")
        for i, (name, pts) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            xy = [at(x, y) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy:
                draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
            draw.text((width - right - 150, off + top + 14 * i - 6), name, fill=colour)
    return image
