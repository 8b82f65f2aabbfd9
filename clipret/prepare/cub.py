"""CUB-200-2011 from ``CUB_200_2011.tgz`` (or its extracted ``CUB_200_2011/`` folder), the metric-learning split.

``CUB_200_2011/images.txt`` lists ``<image id> <NNN.Class_Name>/<file>.jpg`` and
``image_class_labels.txt`` ``<image id> <class id>``; the images are
``CUB_200_2011/images/<NNN.Class_Name>/<file>.jpg``, copied as they are. Classes 1-100 train,
classes 101-200 are the test set, used as both queries and gallery (the shared-test protocol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw, read_texts
from clipret.prepare.plan import Plan, entries, subsample

__all__ = ["POLICY", "plan_cub200", "id_table"]

TOP = "CUB_200_2011"
POLICY = ("metric-learning split: classes 1-100 (5864 images) train, classes 101-200 (5924 images) are the test set, "
          "every test image a query over all the others (test/query links to test/gallery; a query's own image is left out)")


def id_table(lines: list[str], where: str) -> dict[str, str]:
    """{first field: second field} of ``<id> <value>`` lines (the value may not hold spaces)."""
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ClipretError(f"{where}: expected '<id> <value>' lines, got {line!r}")
        out[parts[0]] = parts[1]
    return out


def plan_cub200(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of CUB-200-2011 (``cfg``: seed, train_per_class)."""
    raw = open_raw(src, ["CUB_200_2011.tgz", "CUB_200_2011.tar.gz", "CUB_200_2011.tar"], TOP, "cub200")
    lists = [f"{TOP}/images.txt", f"{TOP}/image_class_labels.txt"]
    texts = read_texts(raw, lists)
    paths = id_table(texts[lists[0]], f"{raw.where}:{lists[0]}")
    classes = id_table(texts[lists[1]], f"{raw.where}:{lists[1]}")
    train: list[tuple[str, str, str]] = []
    test: list[tuple[str, str, str]] = []
    for image_id, rel in paths.items():
        parts = rel.split("/")
        if image_id not in classes or len(parts) != 2 or not classes[image_id].isdigit():
            raise ClipretError(f"{raw.where}: image {image_id} ({rel}) has no class id in image_class_labels.txt")
        item = (parts[0], parts[1], member_name(f"{TOP}/images/{rel}", raw.where))
        (train if int(classes[image_id]) <= 100 else test).append(item)
    keep = subsample([c for c, _, _ in train], cfg["train_per_class"], cfg["seed"])
    return Plan("cub200", entries("training", [train[i] for i in keep]) + entries("gallery", test), member_fill(raw),
                shared_test=True)
