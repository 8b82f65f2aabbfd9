"""Stanford Online Products from ``Stanford_Online_Products.zip`` (or its extracted folder), the official split.

``Stanford_Online_Products/Ebay_train.txt`` and ``Ebay_test.txt`` start with the header
``image_id class_id super_class_id path``; ``path`` (``bicycle_final/111085122871_0.JPG``) is
under ``Stanford_Online_Products/``. The class is the product (``class_id``, folder ``NNNNN``);
images are copied as they are. The test set (classes 11319-22634) is used as both queries and
gallery (the shared-test protocol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw, read_texts
from clipret.prepare.plan import Plan, entries, subsample

__all__ = ["POLICY", "plan_sop"]

TOP = "Stanford_Online_Products"
POLICY = ("official split (Ebay_train.txt: 11318 products, 59551 images; Ebay_test.txt: 11316 products, 60502 images); "
          "class = product; every test image a query over all the others (test/query links to test/gallery; "
          "a query's own image is left out)")


def _parse(lines: list[str], where: str) -> list[tuple[str, str, str]]:
    """(class folder, file name, member) of every row after the header."""
    if not lines or lines[0].split()[:4] != ["image_id", "class_id", "super_class_id", "path"]:
        raise ClipretError(f"{where}: expected the header 'image_id class_id super_class_id path'")
    out = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != 4 or not parts[1].isdigit():
            raise ClipretError(f"{where}: expected 'image_id class_id super_class_id path' rows, got {line!r}")
        member = member_name(f"{TOP}/{parts[3]}", where)
        out.append((f"{int(parts[1]):05d}", member.rsplit("/", 1)[-1], member))
    return out


def plan_sop(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of Stanford Online Products (``cfg``: seed, train_per_class)."""
    raw = open_raw(src, ["Stanford_Online_Products.zip"], TOP, "sop")
    lists = [f"{TOP}/Ebay_train.txt", f"{TOP}/Ebay_test.txt"]
    texts = read_texts(raw, lists)
    train = _parse(texts[lists[0]], f"{raw.where}:{lists[0]}")
    test = _parse(texts[lists[1]], f"{raw.where}:{lists[1]}")
    keep = subsample([c for c, _, _ in train], cfg["train_per_class"], cfg["seed"])
    return Plan("sop", entries("training", [train[i] for i in keep]) + entries("gallery", test), member_fill(raw),
                shared_test=True)
