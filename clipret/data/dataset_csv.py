"""The dataset CSV: one file in place of the folder layout, as open-metric-learning's users know it.

    path,label,split[,is_query,is_gallery]
    training/cat/1.jpg,cat,train,,
    test/cat/7.jpg,cat,validation,1,1

``path`` is relative to the CSV's folder (POSIX separators; it may not be absolute nor hold
``..``), and is the image's id. ``split`` is ``train`` or ``validation``. ``is_query`` and
``is_gallery`` (1/0, true/false, yes/no) say what a validation row is for; without those columns
every validation row is both, and a query's own row is left out of its ranking (the self-match
rule). Every query needs another gallery row of its label, else the CSV is refused, naming the
row, as is a malformed row, a missing image, an unknown split or a path given twice.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipret.errors import ClipretError

__all__ = ["COLUMNS", "ROWS", "DatasetCSV", "DatasetRow", "is_dataset_csv", "read_dataset_csv", "write_dataset_csv"]

COLUMNS = ("path", "label", "split", "is_query", "is_gallery")
SPLITS = ("train", "validation")
ROWS = ("gallery", "query", "validation", "train", "all")  # what a command may take from the CSV
_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True)
class DatasetRow:
    """One image of a dataset CSV: its id (``path``), label, split and validation roles."""

    path: str
    label: str
    split: str
    is_query: bool = True
    is_gallery: bool = True


@dataclass
class DatasetCSV:
    """A read and checked dataset CSV; images live at ``root / row.path``."""

    file: Path
    root: Path
    rows: list[DatasetRow]

    def ids(self, which: str = "all") -> list[str]:
        """Sorted ids of the rows ``which`` names: ``train``, ``validation``, ``query`` or ``gallery``
        (validation rows with that role), or ``all``."""
        if which not in ROWS:
            raise ClipretError(f"unknown row selection {which!r}; use one of {', '.join(ROWS)}")
        keep = {
            "all": lambda r: True,
            "train": lambda r: r.split == "train",
            "validation": lambda r: r.split == "validation",
            "query": lambda r: r.split == "validation" and r.is_query,
            "gallery": lambda r: r.split == "validation" and r.is_gallery,
        }[which]
        ids = sorted(r.path for r in self.rows if keep(r))
        if not ids:
            raise ClipretError(f"{self.file} has no {which} rows")
        return ids

    def labels(self) -> dict[str, str]:
        """{id: label} of every row."""
        return {r.path: r.label for r in self.rows}


def is_dataset_csv(path: str | os.PathLike[str]) -> bool:
    """True for an existing ``.csv`` file whose header names a ``split`` column (a labels CSV,
    ``filename,label``, has none); :func:`read_dataset_csv` then checks the other columns."""
    p = Path(path)
    if p.suffix.lower() != ".csv" or not p.is_file():
        return False
    with open(p, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return "split" in {h.strip().lower() for h in header}


def _flag(value: str, where: str, column: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ClipretError(f"{where}: {column} must be 1 or 0 (or true/false), got {value!r}")


def _image_id(value: str, where: str) -> str:
    text = value.strip()
    p = PurePosixPath(text)
    if not text or p.is_absolute() or ".." in p.parts or "\\" in text or (p.parts and ":" in p.parts[0]):
        raise ClipretError(f"{where}: path {value!r} escapes the CSV's folder; give paths relative to it, without '..'")
    return p.as_posix()


def read_dataset_csv(path: str | os.PathLike[str], *, check_files: bool = True) -> DatasetCSV:
    """Read and check a dataset CSV (see the module docstring); one-line :class:`ClipretError` naming the row."""
    file = Path(path)
    if not file.is_file():
        raise ClipretError(f"dataset CSV not found: {file}")
    root = file.parent
    rows: list[DatasetRow] = []
    seen: dict[str, int] = {}
    with open(file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in COLUMNS[:3] if c not in header]
        if missing:
            raise ClipretError(f"{file}:1: the header must name {','.join(COLUMNS[:3])}[,is_query,is_gallery]; "
                               f"missing {', '.join(missing)}")
        col = {name: header.index(name) for name in COLUMNS if name in header}
        roles = "is_query" in col and "is_gallery" in col
        for lineno, record in enumerate(reader, 2):
            if not record or not "".join(record).strip():
                continue
            where = f"{file}:{lineno}"
            if len(record) != len(header):
                raise ClipretError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(record)}")
            image_id = _image_id(record[col["path"]], where)
            label, split = record[col["label"]].strip(), record[col["split"]].strip().lower()
            if not label:
                raise ClipretError(f"{where}: {image_id} has no label")
            if split not in SPLITS:
                raise ClipretError(f"{where}: unknown split {record[col['split']]!r}; use train or validation")
            if image_id in seen:
                raise ClipretError(f"{where}: {image_id} is listed twice (first on line {seen[image_id]})")
            if check_files and not (root / image_id).is_file():
                raise ClipretError(f"{where}: image not found: {root / image_id}")
            seen[image_id] = lineno
            is_query = _flag(record[col["is_query"]], where, "is_query") if roles else True
            is_gallery = _flag(record[col["is_gallery"]], where, "is_gallery") if roles else True
            rows.append(DatasetRow(image_id, label, split, is_query, is_gallery))
    if not rows:
        raise ClipretError(f"dataset CSV {file} has no rows")
    _check_queries(file, rows, seen)
    return DatasetCSV(file, root, rows)


def _check_queries(file: Path, rows: list[DatasetRow], lines: dict[str, int]) -> None:
    """Every validation query needs a gallery row of its label other than its own."""
    gallery: dict[str, set[str]] = {}
    for r in rows:
        if r.split == "validation" and r.is_gallery:
            gallery.setdefault(r.label, set()).add(r.path)
    for r in rows:
        if r.split == "validation" and r.is_query and not (gallery.get(r.label, set()) - {r.path}):
            raise ClipretError(f"{file}:{lines[r.path]}: validation row {r.path} is the only one of label {r.label!r}; "
                               "a query needs another gallery row of its label")


def write_dataset_csv(path: str | os.PathLike[str], rows: Iterable[DatasetRow]) -> None:
    """Write ``path,label,split,is_query,is_gallery`` (roles as 1/0, empty on train rows), atomically."""
    from clipret.artifacts.atomic import atomic_open

    with atomic_open(path, "w") as fh:  # utf-8; csv rows end in "\n" (lineterminator)
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in rows:
            roles = ("", "") if r.split == "train" else (int(r.is_query), int(r.is_gallery))
            writer.writerow([r.path, r.label, r.split, *roles])
