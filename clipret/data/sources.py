"""Where a command's images come from: a folder, or a dataset CSV (:mod:`clipret.data.dataset_csv`).

Both give sorted ids relative to one folder, the images' root: the folder itself, or the CSV's
folder. Everything downstream (decoding, manifests, self-matches) sees only that root and ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipret.data.dataset_csv import is_dataset_csv, read_dataset_csv
from clipret.data.layout import scan_images
from clipret.errors import ClipretError

__all__ = ["image_root", "list_images_of", "check_source"]


def image_root(source: str | os.PathLike[str]) -> Path:
    """The folder ids are relative to: ``source`` itself, or a dataset CSV's folder."""
    return Path(source).parent if is_dataset_csv(source) else Path(source)


def list_images_of(source: str | os.PathLike[str], rows: str | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(sorted ids, skipped files with reasons) of a folder (:func:`clipret.data.layout.scan_images`)
    or of a dataset CSV's ``rows`` (``gallery`` unless given: see :meth:`DatasetCSV.ids`)."""
    if is_dataset_csv(source):
        return read_dataset_csv(source).ids(rows or "gallery"), []
    if rows is not None:
        raise ClipretError(f"--rows picks rows of a dataset CSV; {source} is a folder")
    return scan_images(source)


def check_source(source: str | os.PathLike[str]) -> None:
    """Refuse at once (before a model loads) a source that is neither a folder nor a good dataset
    CSV (every row checked: :func:`clipret.data.dataset_csv.read_dataset_csv`)."""
    p = Path(source)
    if p.is_dir():
        return
    if is_dataset_csv(p):
        read_dataset_csv(p)
        return
    if p.is_file() and p.suffix.lower() == ".csv":
        raise ClipretError(f"{p} is not a dataset CSV: its header must name path,label,split[,is_query,is_gallery]")
    raise ClipretError(f"folder not found: {p}")
