"""Write a :class:`~clipret.prepare.plan.Plan` into ROOT: atomic per file, resumable, marked when done.

    ROOT/prepare.json            what was prepared: dataset, settings, split policy, counts, complete
    ROOT/training/<class>/*      training images
    ROOT/test/query/<class>/*    queries (or a relative link to gallery: the shared-test protocol)
    ROOT/test/gallery/<class>/*  gallery images
    ROOT/test/labels.csv         filename,label of the query and gallery ids
    ROOT/dataset.csv             with --csv: the dataset CSV (clipret.data.dataset_csv)

``prepare.json`` is written first with ``"complete": false`` (it names the dataset and its
settings, so a rerun with other settings is refused), then images, links and CSVs, and last
``prepare.json`` again with ``"complete": true``. Each image is written through
:func:`~clipret.artifacts.atomic.atomic_path`, so a file that exists is whole: a rerun after a
crash writes only the missing files. A rerun over a complete ROOT whose files are all still
there does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clipret.artifacts.atomic import atomic_path, read_json, remove_stale_temps, write_json
from clipret.data.layout import ensure_empty_targets, is_image_name, write_labels_csv
from clipret.errors import ClipretError
from clipret.progress import StageProgress
from clipret.prepare.plan import Plan

__all__ = ["MARKER", "FORMAT", "complete_summary", "write_plan", "count_images"]

MARKER = "prepare.json"
FORMAT = "clipret-prepare/1"


def _read_marker(root: Path) -> dict[str, Any] | None:
    p = root / MARKER
    if not p.is_file():
        return None
    marker = read_json(p, "prepare marker")
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise ClipretError(f"{p} is not a clipret prepare marker; choose another ROOT")
    return marker


def _check_same(root: Path, marker: dict[str, Any], dataset: str, settings: dict[str, Any]) -> None:
    if marker.get("dataset") != dataset:
        raise ClipretError(f"{root} holds {marker.get('dataset')}, not {dataset}; choose another ROOT or delete it")
    if marker.get("settings") != settings:
        old, new = marker.get("settings") or {}, settings
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise ClipretError(f"{root} holds {dataset} prepared with other settings ({diff}); choose another ROOT or delete it")


def count_images(folder: Path) -> int:
    """Image files under ``folder`` (hidden files and folders skipped, links followed); 0 if it is missing."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n += sum(1 for f in filenames if not f.startswith(".") and is_image_name(f))
    return n


def _query_link_ok(root: Path) -> bool:
    link = root / "test" / "query"
    return link.is_symlink() and os.readlink(link) == "gallery"


def complete_summary(root: Path, dataset: str, settings: dict[str, Any], csv: bool) -> dict[str, Any] | None:
    """The marker of a complete ROOT prepared with these settings whose files are all there; None when
    there is work to do. A ROOT holding another dataset, other settings, or files clipret did not
    write is refused with a one-line :class:`ClipretError`."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ClipretError(f"{root} is a file, not a folder; choose another ROOT")
    marker = _read_marker(root)
    if marker is None:
        ensure_empty_targets(root)
        return None
    _check_same(root, marker, dataset, settings)
    if not marker.get("complete"):
        return None
    counts = marker.get("counts", {})
    shared = marker.get("protocol") == "shared"
    found = {"training": count_images(root / "training"), "gallery": count_images(root / "test" / "gallery")}
    found["query"] = found["gallery"] if shared else count_images(root / "test" / "query")
    intact = (found == counts and (root / "test" / "labels.csv").is_file() and (not shared or _query_link_ok(root))
              and (not csv or (root / "dataset.csv").is_file()))
    return marker if intact else None


def _write_entries(root: Path, plan: Plan, progress: StageProgress | None) -> int:
    todo = [e for e in plan.entries if not (root / e.dest).is_file()]
    for folder in {(root / e.dest).parent for e in todo}:
        if folder.is_dir():
            remove_stale_temps(folder)  # what a killed run left half-written
    done = 0
    if progress is not None:
        progress("write", 0, len(todo))
    for entry, data in plan.fill(todo):
        with atomic_path(root / entry.dest, size_hint=len(data)) as tmp:
            tmp.write_bytes(data)
        done += 1
        if progress is not None:
            progress("write", done, len(todo))
    lost = [e.dest for e in todo if not (root / e.dest).is_file()]
    if lost:
        raise ClipretError(f"{plan.dataset}: {len(lost)} image(s) were not found in the raw files (e.g. {lost[0]}); "
                           "the raw files are incomplete: fetch them again")
    return done


def _link_query(root: Path) -> None:
    """``test/query`` -> ``gallery`` (relative), made atomically; a real folder there is refused."""
    link = root / "test" / "query"
    if _query_link_ok(root):
        return
    if link.exists() or link.is_symlink():
        if not link.is_symlink():
            raise ClipretError(f"{link} is a folder; the shared-test protocol makes it a link to gallery: delete it and rerun")
    tmp = link.with_name(f".query.clipret-{os.getpid()}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink("gallery", tmp)
    os.replace(tmp, link)


def _labels_rows(plan: Plan) -> list[tuple[str, str]]:
    rows = {e.id: e.label for e in plan.entries if e.split != "training"}
    return sorted(rows.items())


def _dataset_rows(plan: Plan) -> list[Any]:
    from clipret.data.dataset_csv import DatasetRow

    roles = {"query": (True, False), "gallery": (True, True) if plan.shared_test else (False, True)}
    rows = []
    for e in sorted(plan.entries, key=lambda e: e.dest):
        if e.split == "training":
            rows.append(DatasetRow(e.dest, e.label, "train"))
        else:
            rows.append(DatasetRow(e.dest, e.label, "validation", *roles[e.split]))
    return rows


def write_plan(root: Path, plan: Plan, settings: dict[str, Any], *, policy: str, csv: bool = False,
               progress: StageProgress | None = None) -> dict[str, Any]:
    """Write ``plan`` into ``root`` (see the module docstring); returns the marker plus ``written``, the
    number of image files this run wrote."""
    root = Path(root)
    marker = _read_marker(root)
    if marker is None:
        ensure_empty_targets(root)
    else:
        _check_same(root, marker, plan.dataset, settings)
    base = {"format": FORMAT, "dataset": plan.dataset, "settings": settings, "policy": policy,
            "protocol": "shared" if plan.shared_test else "split"}
    write_json(root / MARKER, {**base, "complete": False})
    written = _write_entries(root, plan, progress)
    if plan.shared_test:
        (root / "test" / "gallery").mkdir(parents=True, exist_ok=True)
        _link_query(root)
    with atomic_path(root / "test" / "labels.csv") as tmp:
        write_labels_csv(tmp, _labels_rows(plan))
    if csv:
        from clipret.data.dataset_csv import write_dataset_csv

        write_dataset_csv(root / "dataset.csv", _dataset_rows(plan))
    counts = plan.counts()
    classes = {"training": len({e.label for e in plan.entries if e.split == "training"}),
               "test": len({e.label for e in plan.entries if e.split != "training"})}
    done = {**base, "complete": True, "counts": counts, "classes": classes}
    write_json(root / MARKER, done)
    return {**done, "written": written}

