"""Cars-196 (Stanford Cars) from ``car_ims.tgz`` and ``cars_annos.mat``, the metric-learning split.

``cars_annos.mat`` holds the struct array ``annotations`` (fields ``relative_im_path`` such as
``car_ims/000001.jpg``, ``class`` 1-196, ``test``) and ``class_names``; it is read with
``scipy.io.loadmat`` (a MATLAB v5 file: no code runs). Classes 1-98 train, classes 99-196 are
the test set, used as both queries and gallery (the shared-test protocol); the official
``test`` flag is not used, as in the metric-learning papers. Class folders are
``NNN.<class name>`` (``001.AM_General_Hummer_SUV_2000``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw
from clipret.prepare.plan import Plan, entries, safe_component, subsample

__all__ = ["POLICY", "ANNOTATIONS", "plan_cars196", "read_annotations"]

ANNOTATIONS = "cars_annos.mat"
POLICY = ("metric-learning split: classes 1-98 (8054 images) train, classes 99-196 (8131 images) are the test set, "
          "every test image a query over all the others (test/query links to test/gallery; a query's own image is left out)")


def _text(value: Any) -> str:
    return str(np.asarray(value).squeeze())


def read_annotations(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """([(relative image path, class id 1..196)], class names) of ``cars_annos.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ClipretError(f"reading {path} needs scipy: pip install scipy") from None
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
        raise ClipretError(f"{path}: cannot read it as a MATLAB file ({exc}); fetch it again") from None
    annos = mat.get("annotations")
    if annos is None or annos.dtype.names is None or not {"relative_im_path", "class"} <= set(annos.dtype.names):
        raise ClipretError(f"{path}: no 'annotations' struct with relative_im_path and class; it is not cars_annos.mat")
    rows = [(_text(a["relative_im_path"]), int(np.asarray(a["class"]).squeeze())) for a in np.atleast_1d(annos)]
    names = [_text(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    return rows, names


def plan_cars196(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of Cars-196 (``cfg``: seed, train_per_class)."""
    annos = src / ANNOTATIONS
    if not annos.is_file():
        raise ClipretError(f"{src} has no {ANNOTATIONS}: pass --source DIR holding car_ims.tgz and {ANNOTATIONS}")
    raw = open_raw(src, ["car_ims.tgz", "car_ims.tar.gz", "car_ims.tar"], "car_ims", "cars196")
    rows, names = read_annotations(annos)
    train: list[tuple[str, str, str]] = []
    test: list[tuple[str, str, str]] = []
    for rel, cid in rows:
        if not 1 <= cid <= 196:
            raise ClipretError(f"{annos}: class {cid} of {rel} is outside 1..196")
        label = f"{cid:03d}" + (f".{safe_component(names[cid - 1])}" if len(names) >= cid else "")
        member = member_name(rel, annos)
        (train if cid <= 98 else test).append((label, member.rsplit("/", 1)[-1], member))
    keep = subsample([c for c, _, _ in train], cfg["train_per_class"], cfg["seed"])
    return Plan("cars196", entries("training", [train[i] for i in keep]) + entries("gallery", test), member_fill(raw),
                shared_test=True)
