"""Reports a person can look at: the worst queries of a results.json, and a run's training curves.

* :func:`results_report`: one self-contained HTML page (the summary metrics, the settings from
  the results sidecar, per-class R@1 and MAP@R, then the ``worst`` queries with their top-k
  thumbnails, hits green and misses red; sortable and filterable), and optionally a PNG contact
  sheet of the same rows.
* :func:`curves_report`: a run folder's ``metrics.jsonl`` as inline SVG line charts in an HTML
  page, or as a PNG.

Every file is written atomically. Nothing is fetched when a page is opened.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["results_report", "curves_report"]

PathLike = str | os.PathLike[str]


def results_report(results: PathLike, out: PathLike, *, labels: PathLike | None = None, gallery: PathLike | None = None,
                   worst: int = 200, k: int = 10, thumb: int = 128, png: PathLike | None = None,
                   queries: PathLike | None = None, gallery_images: PathLike | None = None) -> dict[str, Any]:
    """Write the HTML report of ``results`` to ``out`` (and the contact sheet to ``png``).

    ``worst``: rows kept (the lowest AP first; the summary and the per-class table still cover
    every query); ``k``: items shown per row; ``thumb``: the longest side of a thumbnail, px.
    ``queries`` / ``gallery_images``: the folders the ids are relative to, when the recorded ones
    moved. Returns ``{"rows", "n_queries", "bytes", "missing_images", "notes"}``.
    """
    from clipret.artifacts.atomic import atomic_open
    from clipret.report.data import gather
    from clipret.report.page import render
    from clipret.report.sheet import write_sheet
    from clipret.report.thumbs import Thumbs

    thumbs = Thumbs(thumb)
    data = gather(results, labels=labels, gallery=gallery, worst=worst, k=k, queries=queries, gallery_images=gallery_images)
    text = render(data, thumbs)
    with atomic_open(out, "w") as fh:
        fh.write(text)
    if png is not None:
        write_sheet(data, png, thumbs)
    items = [it for r in data.rows for it in (r.query, *r.items)]
    missing = sorted({it.key for it in items if thumbs.get(it.key, it.path)[0] is None})
    return {"rows": len(data.rows), "n_queries": data.n_queries, "bytes": len(text.encode("utf-8")),
            "missing_images": len(missing), "notes": data.notes}


def curves_report(run: PathLike, out: PathLike | None = None, *, png: PathLike | None = None) -> dict[str, Any]:
    """Write the training curves of the run folder ``run``: HTML with inline SVG to ``out``, and/or
    a PNG to ``png``. Returns ``{"epochs", "charts": {title: [series keys]}}``."""
    from clipret.artifacts.atomic import atomic_open
    from clipret.errors import ClipretError
    from clipret.report.curves import chart_series, png_charts, read_metrics, svg_chart
    from clipret.report.page import page

    rows = read_metrics(run)
    charts = chart_series(rows)
    if not charts:
        raise ClipretError(f"{run}/metrics.jsonl holds no loss, held-out metric or learning rate to draw")
    if out is not None:
        keys = [key for series in charts.values() for key in series]
        head = "".join(f"<th>{escape(x)}</th>" for x in ["epoch", *keys])
        body = "".join("<tr>" + "".join(f'<td class="num">{escape(_cell(r.get(x)))}</td>' for x in ["epoch", *keys]) + "</tr>"
                       for r in rows)
        html = (f"<h1>training curves: {escape(str(run))}</h1>" + "".join(svg_chart(t, s) for t, s in charts.items())
                + f'<h2>Epochs</h2><table id="epochs"><tr>{head}</tr>{body}</table>')
        with atomic_open(out, "w") as fh:
            fh.write(page(f"clipret curves: {Path(run).name}", html))
    if png is not None:
        with atomic_open(png, "wb") as fh:
            png_charts(charts).save(fh, format="PNG")
    return {"epochs": len(rows), "charts": {t: list(s) for t, s in charts.items()}}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
