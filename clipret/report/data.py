"""What a results report shows, gathered from results.json, its sidecar, the labels and the image folders.

No HTML here: :func:`gather` returns a :class:`ReportData` that :mod:`clipret.report.page` and
:mod:`clipret.report.sheet` draw. Metrics come from :func:`clipret.evaluate` (the numbers
``clipret evaluate`` prints), the per-query AP and rank of first hit from its ``worst`` list.
Images are found as ``root / id``, the root being the folder the side's embedding manifest
records (through the results sidecar), unless ``queries`` / ``gallery_images`` override it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError

__all__ = ["Item", "Row", "ReportData", "gather", "image_root"]

PathLike = str | os.PathLike[str]
DEFAULT_KS = (1, 5, 10)


@dataclass
class Item:
    """One image of a row: the query, or a retrieved gallery item.

    ``status``: "hit" or "miss" (labels known), "self" (the query's own item), "" (no labels).
    """

    key: str  # unique over the report: "q:<id>" or "g:<id>"
    id: str
    path: Path | None
    label: str | None = None
    score: float | None = None
    status: str = ""


@dataclass
class Row:
    """A query and its list; ``ap`` and ``first_hit_rank`` (1-based) are None without labels or hit."""

    query: Item
    items: list[Item]
    ap: float | None = None
    first_hit_rank: int | None = None


@dataclass
class ReportData:
    """Everything a results report shows. ``metrics`` is None when the ids have no labels."""

    source: str
    rows: list[Row]
    n_queries: int
    metrics: dict[str, Any] | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    ap_label: str = "AP"
    chance: float | None = None
    settings: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (side, id, reason): not in the results
    n_skipped: int = 0  # all of them, also those the sidecar only counts


def image_root(results_path: Path, side: dict[str, Any] | None, override: Path | None, flag: str) -> Path | None:
    """The folder a side's ids are relative to: ``override``, else the recorded ``root``, else the
    recorded path when it is a folder, else the ``root`` of the ``.npy`` manifest it names."""
    from clipret.artifacts import manifest_path, read_json
    from clipret.retrieval.compat import recorded_path

    if override is not None:
        if not Path(override).is_dir():
            raise ClipretError(f"{flag} {override} is not a folder; pass the folder the image ids are relative to")
        return Path(override)
    side = side or {}
    if isinstance(side.get("root"), str) and Path(side["root"]).is_dir():
        return Path(side["root"])
    where = recorded_path(results_path, side)
    if where is not None and where.is_dir():
        return where
    if where is not None and where.suffix == ".npy" and manifest_path(where).is_file():
        root = (read_json(manifest_path(where), "manifest") or {}).get("root")
        if isinstance(root, str) and Path(root).is_dir():
            return Path(root)
    return None


def _path(root: Path | None, image_id: str) -> Path | None:
    from clipret.data.layout import id_to_path

    if root is None:
        return None
    try:
        return id_to_path(root, image_id)
    except ClipretError:  # an unsafe id is shown as a placeholder, never opened
        return None


def gather(results: PathLike, *, labels: PathLike | None = None, gallery: PathLike | None = None, worst: int = 200,
           k: int = 10, queries: PathLike | None = None, gallery_images: PathLike | None = None) -> ReportData:
    """Load ``results`` (results.json, with its sidecar or ``gallery``) and gather the ``worst`` rows.

    With labels (``labels`` CSV, else the class subfolder of every id) the rows are the
    ``worst`` queries by AP, worst first, each list cut to its first ``k`` items; without, the
    first ``worst`` queries in file order and no metrics.
    """
    import clipret
    from clipret.api import load_labels
    from clipret.data.layout import labels_for, read_labels_csv
    from clipret.retrieval.results import Results

    path = Path(results)
    if not path.is_file():
        raise ClipretError(f"results file not found: {path}; make one with `clipret query`")
    if worst <= 0 or k <= 0:
        raise ClipretError(f"--worst and --k must be positive, got {worst} and {k}")
    label_map = read_labels_csv(labels) if labels is not None else None
    res = Results.load(path, gallery, labelled=label_map)
    if label_map is None:
        folder = load_labels(None, res.query_ids + res.gallery_ids)
        label_map = folder if len(folder) == len(set(res.query_ids + res.gallery_ids)) else None
    data = ReportData(source=str(path), rows=[], n_queries=len(res), settings=settings_of(res.meta, path))
    data.skipped, data.n_skipped = skipped_of(path, res.meta, gallery)
    roots = {"q": image_root(path, res.meta.get("query"), _opt(queries), "--queries"),
             "g": image_root(path, _gallery_side(res.meta, gallery), _opt(gallery_images), "--gallery-images")}
    for side, flag in (("q", "--queries"), ("g", "--gallery-images")):
        if roots[side] is None:
            data.notes.append(f"the {'query' if side == 'q' else 'gallery'} image folder is not recorded or no longer "
                              f"exists: pass {flag} DIR to show those images")
    position = {q: i for i, q in enumerate(res.query_ids)}
    if label_map is None:
        data.notes.append("no labels (pass --labels labels.csv): no metrics, no hit/miss colours; rows in file order")
        picked = [(q, None, None) for q in res.query_ids[:worst]]
    else:
        width = max((len(s) for s in res.ids), default=0)
        metrics = clipret.evaluate(res, labels=label_map, k=sorted({*DEFAULT_KS, width}), per_class=True, worst=worst)
        data.per_class, worst_rows = metrics.pop("per_class"), metrics.pop("worst")
        data.metrics, data.chance = metrics, chance_level(res, label_map)
        data.ap_label = "AP" if "map" in metrics else f"AP@{width}"
        picked = [(w["id"], w["ap"], w["first_hit_rank"]) for w in worst_rows]
    for qid, ap, first in picked:
        i = position[qid]
        own = res.gallery_ids[res.self_rows[i]] if res.self_rows[i] >= 0 else None
        gids = res.ids[i][:k]
        q_label = labels_for([qid], label_map, "query")[0] if label_map is not None else None
        g_labels = labels_for(gids, label_map, "gallery") if label_map is not None else [None] * len(gids)
        items = [Item(f"g:{g}", g, _path(roots["g"], g), lab, float(s), _status(g, own, lab, q_label))
                 for g, lab, s in zip(gids, g_labels, res.scores[i])]
        data.rows.append(Row(Item(f"q:{qid}", qid, _path(roots["q"], qid), q_label), items, ap, first))
    return data


def skipped_of(results_path: Path, meta: dict[str, Any], gallery: PathLike | None = None
               ) -> tuple[list[tuple[str, str, str]], int]:
    """``([(side, id, reason)], count)``: the images of either side that could not be read when they
    were embedded (so no result holds them). From the sidecar; for a sidecar written before it
    recorded them, from the manifest of the ``.npy`` it names."""
    from clipret.artifacts import manifest_path, read_json
    from clipret.retrieval.compat import recorded_path

    listed: list[tuple[str, str, str]] = []
    count = 0
    for side, recorded in (("query", meta.get("query")), ("gallery", _gallery_side(meta, gallery))):
        recorded = recorded or {}
        entries = recorded.get("skipped")
        if entries is None:
            where = recorded_path(results_path, recorded)
            if where is not None and where.suffix == ".npy" and manifest_path(where).is_file():
                entries = (read_json(manifest_path(where), "manifest") or {}).get("skipped")
        entries = [e for e in entries or [] if isinstance(e, dict)]
        listed += [(side, str(e.get("id")), str(e.get("reason", ""))) for e in entries]
        count += max(int(recorded.get("skipped_count") or 0), len(entries))
    return listed, count


def _opt(p: PathLike | None) -> Path | None:
    return Path(p) if p is not None else None


def _gallery_side(meta: dict[str, Any], gallery: PathLike | None) -> dict[str, Any] | None:
    return {"path": str(Path(gallery).resolve())} if gallery is not None else meta.get("gallery")


def _status(gid: str, own: str | None, label: str | None, query_label: str | None) -> str:
    if gid == own:
        return "self"
    if label is None or query_label is None:
        return ""
    return "hit" if label == query_label else "miss"


def chance_level(res: Any, label_map: dict[str, str]) -> float | None:
    """Mean over queries with R > 0 of R / G: the expected R@1 (and precision) of a random ranking.

    G is the gallery size less the query's own item when it is left out, as R is.
    """
    from clipret import metrics
    from clipret.evaluation import label_codes

    q_codes, g_codes = label_codes(res.query_ids, res.gallery_ids, label_map)
    r = metrics.count_relevant(q_codes, g_codes)
    own = np.asarray(res.self_rows, dtype=np.int64)
    has_own = own >= 0
    r = r - (has_own & (g_codes[np.maximum(own, 0)] == q_codes))
    size = len(res.gallery_ids) - has_own
    keep = r > 0
    return float(np.mean(r[keep] / size[keep])) if keep.any() else None


def settings_of(meta: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """(name, value) lines of how the results were made, from the sidecar's meta."""
    if not meta:
        return [("sidecar", f"none ({path.name}.json is missing): settings unknown")]
    q, g = meta.get("query") or {}, meta.get("gallery") or {}
    flags = q.get("flags") or g.get("flags") or {}
    stages = meta.get("stages") or {}
    sm = meta.get("self_matches") or {}
    return [
        ("model", str(flags.get("model", "unknown"))),
        ("model fingerprint", f"query {q.get('fingerprint')}, gallery {g.get('fingerprint')}"),
        ("test-time augmentation", f"query {(q.get('flags') or {}).get('tta') or 'none'}, "
                                   f"gallery {(g.get('flags') or {}).get('tta') or 'none'}"),
        ("stages", "; ".join(f"{name} ({', '.join(f'{a}={b}' for a, b in (p or {}).items())})" for name, p in stages.items())
         or "none (plain search)"),
        ("list depth k", str(meta.get("k", "unknown"))),
        ("score", str(meta.get("score", "unknown"))),
        ("queries", f"{q.get('count')} from {q.get('path')}"),
        ("gallery", f"{g.get('count')} from {g.get('path')}"),
        ("self-matches left out", f"{sm.get('excluded', 0)} (kept {sm.get('kept', 0)}; rule: {sm.get('rule', 'unknown')})"),
        ("clipret version", str(meta.get("clipret_version", "unknown"))),
    ]
