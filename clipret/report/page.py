"""The results report as ONE self-contained HTML file: inline CSS, a few lines of plain JavaScript,
thumbnails as base64 JPEG ``data:`` URIs. It fetches nothing (a Content-Security-Policy says so)
and needs no server.

Each distinct image is embedded once, in a JSON block; ``<img data-k=KEY>`` elements get their
``src`` from it when the page loads (a gallery image that comes back in many lists costs its
bytes once). An image that is missing or unreadable is a ``<div class="missing">`` naming it,
never a broken ``<img>``. Every id, label and path is escaped: they are data, never markup.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

from clipret.report.data import Item, ReportData, Row
from clipret.report.thumbs import Thumbs, data_uri

__all__ = ["HIT_COLOUR", "MISS_COLOUR", "SELF_COLOUR", "render", "page"]

HIT_COLOUR, MISS_COLOUR, SELF_COLOUR = "#1a9c3c", "#d62728", "#888888"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.controls {{ margin: 1em 0; }}
.row {{ display: flex; gap: 6px; align-items: flex-start; padding: 6px 0; border-top: 1px solid #ddd; }}
.row[hidden] {{ display: none; }}
.tables {{ display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }}
.query {{ width: 14em; flex: none; word-break: break-all; font-size: 12px; }}
.query figure {{ display: block; width: max-content; border-color: #333; }}
figure {{ display: inline-block; margin: 0; border: 4px solid transparent; text-align: center; font-size: 11px; }}
figure img, .missing {{ display: block; margin: 0 auto; object-fit: contain; background: #f4f4f4; }}
figure.hit {{ border-color: {HIT_COLOUR}; }}
figure.miss {{ border-color: {MISS_COLOUR}; }}
figure.self {{ border-color: {SELF_COLOUR}; border-style: dashed; }}
.missing {{ background: #eee; color: #555; font-size: 10px; word-break: break-all; overflow: hidden; }}
.note {{ color: #a05a00; }}
.legend {{ margin-left: 1em; color: #555; }}
.hit-text {{ color: {HIT_COLOUR}; }}
.miss-text {{ color: {MISS_COLOUR}; }}
"""

SCRIPT = """
const T = JSON.parse(document.getElementById('thumbs').textContent);
for (const im of document.querySelectorAll('img[data-k]')) im.src = T[im.dataset.k];
const rows = document.getElementById('rows'), sort = document.getElementById('sort'), only = document.getElementById('filter');
const num = (r, k, none) => r.dataset[k] === '' ? none : Number(r.dataset[k]);
const keys = {
  'ap-asc': (a, b) => num(a, 'ap', 2) - num(b, 'ap', 2),
  'ap-desc': (a, b) => num(b, 'ap', -1) - num(a, 'ap', -1),
  'first-hit': (a, b) => num(b, 'first', 1e9) - num(a, 'first', 1e9),
  'label': (a, b) => a.dataset.label.localeCompare(b.dataset.label),
  'id': () => 0,
};
function apply() {
  const byId = (a, b) => a.dataset.id < b.dataset.id ? -1 : a.dataset.id > b.dataset.id ? 1 : 0;
  const list = Array.from(rows.children).sort((a, b) => keys[sort.value](a, b) || byId(a, b));
  for (const r of list) { rows.appendChild(r); r.hidden = only.value !== '' && r.dataset.label !== only.value; }
}
sort.addEventListener('change', apply); only.addEventListener('change', apply);
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(head: list[str], rows: list[list[Any]], table_id: str) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{escape(_fmt(v))}</td>' if isinstance(v, (int, float)) or v is None
                                    else f"<td>{escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><tr>{cells}</tr>{body}</table>'


class _Images:
    """The thumbnails a page uses: ``tag(item)`` -> ``<img data-k>`` or the placeholder; ``json()`` the data."""

    def __init__(self, thumbs: Thumbs) -> None:
        self.thumbs, self.keys, self.uris = thumbs, {}, {}

    def tag(self, item: Item) -> str:
        img, reason = self.thumbs.get(item.key, item.path)
        size = self.thumbs.size  # every image is shown in a size x size box, small ones scaled up
        if img is None:
            return (f'<div class="missing" style="width:{size}px;height:{size}px" title="{escape(item.id)}: {escape(str(reason))}">'
                    f"{escape(item.id)}<br>({escape(str(reason))})</div>")
        if item.key not in self.keys:
            self.keys[item.key] = f"i{len(self.keys)}"
            self.uris[self.keys[item.key]] = data_uri(img)
        return (f'<img data-k="{self.keys[item.key]}" width="{size}" height="{size}" '
                f'alt="{escape(item.id)}" title="{escape(item.id)}">')

    def json(self) -> str:
        return json.dumps(self.uris).replace("</", "<\\/")


def _digits(scores: list[float]) -> int:
    """Decimals that tell a list's scores apart: 4, or up to 6 (what results.json holds) when they are close."""
    for d in (4, 5):
        if len({round(x, d) for x in scores}) == len(set(scores)):
            return d
    return 6


def _row(row: Row, images: _Images, ap_label: str) -> str:
    q = row.query
    data = (f'data-id="{escape(q.id)}" data-label="{escape(q.label or "")}" '
            f'data-ap="{"" if row.ap is None else repr(row.ap)}" data-first="{row.first_hit_rank or ""}"')
    facts = [escape(q.id), f"label: {escape(q.label)}" if q.label is not None else ""]
    if row.ap is not None:
        facts += [f"{escape(ap_label)}: {row.ap:.3f}", f"first hit: {row.first_hit_rank or 'none in list'}"]
    query = (f'<div class="query"><figure>{images.tag(q)}</figure>'
             + "<br>".join(f for f in facts if f) + "</div>")
    digits = _digits([it.score for it in row.items if it.score is not None])
    items = "".join(
        f'<figure class="item {it.status}" data-label="{escape(it.label or "")}">{images.tag(it)}'
        f"<figcaption>{'-' if it.score is None else f'{it.score:.{digits}f}'}</figcaption></figure>"
        for it in row.items)
    return f'<div class="row" {data}>{query}{items}</div>'


SKIPPED_SHOWN = 200  # skipped images listed on the page (all are counted)


def render(data: ReportData, thumbs: Thumbs) -> str:
    """The report's HTML text for ``data``; ``thumbs`` makes (and keeps) the thumbnails."""
    images = _Images(thumbs)
    rows = "".join(_row(r, images, data.ap_label) for r in data.rows)
    parts = [f"<h1>clipret report: {escape(data.source)}</h1>"]
    parts += [f'<p class="note">{escape(n)}</p>' for n in data.notes]
    tables = []
    if data.metrics is not None:
        summary = [[key, value] for key, value in data.metrics.items()]
        if data.chance is not None:
            summary.append(["chance R@1 (mean R / gallery size)", data.chance])
        tables.append(("Summary", _table(["metric", "value"], summary, "summary")))
    if data.per_class:
        tables.append(("Per class, worst first", _table(["class", "queries", "R@1", "MAP@R"], [
            [c["class"], c["n_queries"], c["recall@1"], c["map@r"]] for c in data.per_class], "per-class")))
    tables.append(("Settings", _table(["setting", "value"], [list(s) for s in data.settings], "settings")))
    if data.n_skipped:
        shown_skips = data.skipped[:SKIPPED_SHOWN]
        more = data.n_skipped - len(shown_skips)
        tables.append((f"Skipped images ({data.n_skipped}: unreadable when embedded, in no result)",
                       _table(["side", "id", "reason"], [list(s) for s in shown_skips], "skipped")
                       + (f'<p class="note">+{more} more, not listed here</p>' if more else "")))
    parts.append('<div class="tables">' + "".join(f"<section><h2>{t}</h2>{html}</section>" for t, html in tables) + "</div>")
    shown = f"{len(data.rows)} of {data.n_queries} queries" + (", the lowest AP first" if data.metrics else "")
    labels = sorted({r.query.label for r in data.rows if r.query.label is not None})
    options = "".join(f'<option value="{escape(lab)}">{escape(lab)}</option>' for lab in labels)
    parts += [f"<h2>Queries ({shown})</h2>",
              '<div class="controls"><label>sort <select id="sort">'
              f'<option value="ap-asc">{escape(data.ap_label)}, worst first</option>'
              f'<option value="ap-desc">{escape(data.ap_label)}, best first</option>'
              '<option value="first-hit">first hit, latest first</option>'
              '<option value="label">class</option><option value="id">query id</option></select></label> '
              f'<label>class <select id="filter"><option value="">all</option>{options}</select></label> '
              '<span class="legend">border: <b class="hit-text">green</b> a hit (same label), '
              '<b class="miss-text">red</b> a miss, dashed grey the query itself</span></div>',
              f'<div id="rows">{rows}</div>']
    return page("clipret report", "".join(parts), images.json(), SCRIPT)


def page(title: str, body: str, thumbs_json: str | None = None, script: str = "", css: str = CSS) -> str:
    """A whole HTML document around ``body`` (already escaped markup), with its CSS, the thumbnails'
    JSON (``{key: data URI}``, for ``<img data-k>``) and a script, when given."""
    data = f'<script type="application/json" id="thumbs">{thumbs_json}</script>' if thumbs_json is not None else ""
    code = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{escape(title)}</title><style>{css}</style></head><body>{body}{data}{code}</body></html>\n")
