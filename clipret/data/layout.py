"""Find images in the dataset layout and give each a stable id.

    ROOT/training/<class>/*       labelled training images
    ROOT/test/query/*             flat, or with class subfolders
    ROOT/test/gallery/*

An image's id is its path relative to the folder that was given, with POSIX
separators. Ids are always sorted, so row ``i`` of every array clipret writes
belongs to ``ids[i]``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from clipret.errors import ClipretError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


def is_image_name(name: str) -> bool:
    """True for the image extensions clipret reads, matched case-insensitively."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Sorted ids (relative POSIX paths) of every image file under ``folder``.

    Hidden files and folders are ignored. Broken symlinks with an image
    extension are listed, so that decoding can report them as skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipretError(f"folder not found: {folder}")
    ids: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                ids.append((PurePosixPath(*rel.parts) / name).as_posix())
    ids.sort()
    if not ids:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ClipretError(f"no images found in {folder} (looked for {exts})")
    return ids


def id_to_path(folder: str | os.PathLike[str], image_id: str) -> Path:
    """Turn an id back into a path under ``folder``, refusing ids that escape it.

    Ids come from manifests, which are data: an absolute id or one holding
    ``..`` is rejected.
    """
    p = PurePosixPath(image_id)
    unsafe = not p.parts or p.is_absolute() or ".." in p.parts or "\\" in image_id or ":" in p.parts[0]
    if unsafe:
        raise ClipretError(f"refusing unsafe image id {image_id!r}: ids must be relative paths without '..'")
    return Path(folder).joinpath(*p.parts)


def folder_labels(ids: Iterable[str]) -> dict[str, str]:
    """Labels from class subfolders: the first path component of each id.

    Ids at the top level (a flat folder) get no label.
    """
    return {i: PurePosixPath(i).parts[0] for i in ids if len(PurePosixPath(i).parts) > 1}


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``filename,label`` rows (a header row is optional) into {id: label}."""
    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"labels file not found: {path}")
    labels: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ClipretError(f"{path}:{lineno}: expected 'filename,label', got {row!r}")
            key, label = row[0].strip(), row[1].strip()
            if lineno == 1 and key.lower() in {"filename", "file", "id", "image", "path"}:
                continue
            key = key.replace("\\", "/")
            if labels.get(key, label) != label:
                raise ClipretError(f"{path}:{lineno}: {key!r} has two labels ({labels[key]!r}, {label!r})")
            labels[key] = label
    if not labels:
        raise ClipretError(f"labels file {path} is empty")
    return labels


def labels_for(ids: Sequence[str], labels: Mapping[str, str], what: str) -> list[str]:
    """Look up every id's label; a missing id is an error that names a few of them.

    A CSV may name files by their bare file name; that is accepted when it is
    unambiguous.
    """
    out: list[str] = []
    missing: list[str] = []
    for i in ids:
        label = labels.get(i)
        if label is None:
            label = labels.get(PurePosixPath(i).name)
        if label is None:
            missing.append(i)
        else:
            out.append(label)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ClipretError(f"{len(missing)} {what} ids have no label ({shown}); add them to the labels CSV")
    return out


def training_set(root: str | os.PathLike[str]) -> tuple[list[str], list[str], Path]:
    """Ids and class names of ``ROOT/training/<class>/*``; returns (ids, labels, folder)."""
    root = Path(root)
    folder = root / "training" if (root / "training").is_dir() else root
    if not root.is_dir():
        raise ClipretError(f"dataset folder not found: {root}")
    ids = list_images(folder)
    by_folder = folder_labels(ids)
    loose = [i for i in ids if i not in by_folder]
    if loose:
        raise ClipretError(f"{len(loose)} images sit directly in {folder} (e.g. {loose[0]}); put each in a <class>/ subfolder")
    labels = [by_folder[i] for i in ids]
    n_classes = len(set(labels))
    if n_classes < 2:
        raise ClipretError(f"{folder} has {n_classes} class folder(s); metric learning needs at least 2 classes")
    return ids, labels, folder
