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


def scan_images(folder: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Find every image file under ``folder``: (sorted ids, skipped files with reasons).

    Ids are relative POSIX paths. Hidden files and folders are ignored.
    Broken symlinks with an image extension are listed, so that decoding can
    report them as skipped. A file whose name is not valid UTF-8 cannot be an
    id (manifests are UTF-8 JSON): it is skipped with that reason, shown with
    its bad bytes escaped (``caf\\xe9.png``).

    Directory symlinks are followed at most once each, by real path: a link
    whose target lies inside ``folder`` is not followed (the target is listed
    under its own path), nor is a link to a folder already listed, so a link
    loop cannot multiply the images. Links to folders outside are followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipretError(f"folder not found: {folder}")
    root_real = os.path.realpath(folder)
    visited = {root_real}
    ids: list[str] = []
    skipped: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if os.path.islink(full) and (_inside(real, root_real) or real in visited):
                continue
            if real in visited:
                continue
            visited.add(real)
            kept.append(d)
        dirnames[:] = kept
        rel = Path(dirpath).relative_to(folder)
        for name in filenames:
            if name.startswith(".") or not is_image_name(name):
                continue
            image_id = (PurePosixPath(*rel.parts) / name).as_posix()
            if not _is_utf8(image_id):
                shown = os.fsencode(image_id).decode("utf-8", "backslashreplace")
                skipped.append({"id": shown, "reason": "file name is not valid UTF-8; rename the file"})
                continue
            ids.append(image_id)
    ids.sort()
    if not ids:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        extra = f"; {len(skipped)} file(s) skipped, first: {skipped[0]['id']}: {skipped[0]['reason']}" if skipped else ""
        raise ClipretError(f"no images found in {folder} (looked for {exts}){extra}")
    return ids, sorted(skipped, key=lambda s: s["id"])


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Sorted ids of the usable images under ``folder`` (see :func:`scan_images`)."""
    return scan_images(folder)[0]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    """Read ``filename,label`` rows (a header row is optional) into {id: label}; or a dataset CSV's
    (:mod:`clipret.data.dataset_csv`) ``path`` and ``label`` columns."""
    path = Path(path)
    if not path.is_file():
        raise ClipretError(f"labels file not found: {path}")
    from clipret.data.dataset_csv import is_dataset_csv, read_dataset_csv

    if is_dataset_csv(path):  # path,label,split[,...]: the ids are its paths
        return read_dataset_csv(path, check_files=False).labels()
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

    An id is looked up by its full path first. A CSV may instead name files by
    their bare file name (``1.jpg`` for ``cat/1.jpg``); that fallback is used
    only when it is unambiguous: when no other of these ``ids`` without a row
    of its own has the same file name. Otherwise it is an error asking for
    full ids in the CSV.
    """
    by_name: dict[str, list[str]] = {}
    for i in ids:
        if i not in labels:
            by_name.setdefault(PurePosixPath(i).name, []).append(i)
    out: list[str] = []
    missing: list[str] = []
    for i in ids:
        label = labels.get(i)
        if label is None:
            name = PurePosixPath(i).name
            label = labels.get(name)
            if label is not None and len(by_name[name]) > 1:
                a, b = by_name[name][:2]
                raise ClipretError(
                    f"{what} ids {a} and {b} share the file name {name}, so the labels CSV row {name!r} is "
                    "ambiguous; name them by their full ids (paths relative to the folder) in the CSV"
                )
        if label is None:
            missing.append(i)
        else:
            out.append(label)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ClipretError(f"{len(missing)} {what} ids have no label ({shown}); add them to the labels CSV")
    return out


def training_set(root: str | os.PathLike[str]) -> tuple[list[str], list[str], Path, dict[str, str]]:
    """Ids and class names of ``ROOT/training/<class>/*``.

    Returns (ids, labels, folder, unusable): ``unusable`` maps the files that
    cannot be ids (a name that is not valid UTF-8) to the reason, so training
    can list them with the other excluded images. ``root`` may be a dataset CSV: its train and
    validation rows, ids relative to its folder (:func:`validation_ids` tells the latter apart).
    """
    from clipret.data.dataset_csv import is_dataset_csv, read_dataset_csv

    if is_dataset_csv(root):
        table = read_dataset_csv(root)
        rows = sorted(((r.path, r.label) for r in table.rows), key=lambda row: row[0])
        if len({r.label for r in table.rows if r.split == "train"}) < 2:
            raise ClipretError(f"{root} has fewer than 2 labels among its train rows; metric learning needs at least 2 classes")
        return [i for i, _ in rows], [c for _, c in rows], table.root, {}
    root = Path(root)
    folder = root / "training" if (root / "training").is_dir() else root
    if not root.is_dir():
        raise ClipretError(f"dataset folder not found: {root}")
    ids, skipped = scan_images(folder)
    by_folder = folder_labels(ids)
    loose = [i for i in ids if i not in by_folder]
    if loose:
        raise ClipretError(f"{len(loose)} images sit directly in {folder} (e.g. {loose[0]}); put each in a <class>/ subfolder")
    labels = [by_folder[i] for i in ids]
    n_classes = len(set(labels))
    if n_classes < 2:
        raise ClipretError(f"{folder} has {n_classes} class folder(s); metric learning needs at least 2 classes")
    return ids, labels, folder, {s["id"]: s["reason"] for s in skipped}


def validation_ids(root: str | os.PathLike[str]) -> set[str] | None:
    """The ids of a dataset CSV's validation rows (training validates on them); None for a folder."""
    from clipret.data.dataset_csv import is_dataset_csv, read_dataset_csv

    if not is_dataset_csv(root):
        return None
    return {r.path for r in read_dataset_csv(root, check_files=False).rows if r.split == "validation"}


def ensure_empty_targets(root: Path) -> None:
    """Refuse to mix a new dataset into an existing ``training/`` or ``test/`` folder."""
    for sub in ("training", "test"):
        target = root / sub
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ClipretError(f"{target} already exists and is not empty; choose a new folder or remove it")


def write_labels_csv(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    """Write ``filename,label`` with a header row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["filename", "label"])
        writer.writerows(rows)
