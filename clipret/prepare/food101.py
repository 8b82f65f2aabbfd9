"""Food-101 from ``food-101.tar.gz`` (or its extracted ``food-101/`` folder) into clipret's layout.

``food-101/meta/train.txt`` and ``test.txt`` list ``<class>/<id>`` per line (750 training and
250 test images per class); the images are ``food-101/images/<class>/<id>.jpg``, copied as
they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw, read_texts
from clipret.prepare.plan import Plan, listed_split_entries

__all__ = ["POLICY", "plan_food101"]

TOP = "food-101"
POLICY = ("official train/test lists (meta/train.txt, meta/test.txt: 750 + 250 images per class); the test images "
          "of each class are drawn (seeded) into --query-per-class queries and the rest (or --gallery-per-class) gallery")


def _parse(lines: list[str], where: str) -> list[tuple[str, str]]:
    """(class, member name) of every ``<class>/<id>`` line."""
    out = []
    for line in lines:
        parts = line.split("/")
        if len(parts) != 2 or not all(parts):
            raise ClipretError(f"{where}: expected '<class>/<id>' lines, got {line!r}")
        out.append((parts[0], member_name(f"{TOP}/images/{line}.jpg", where)))
    return out


def plan_food101(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of Food-101 (``cfg``: seed, query_per_class, gallery_per_class, train_per_class)."""
    raw = open_raw(src, ["food-101.tar.gz", "food-101.tgz", "food-101.tar"], TOP, "food101")
    names = {split: f"{TOP}/meta/{split}.txt" for split in ("train", "test")}
    texts = read_texts(raw, list(names.values()))
    train = _parse(texts[names["train"]], f"{raw.where}:{names['train']}")
    test = _parse(texts[names["test"]], f"{raw.where}:{names['test']}")
    return Plan("food101", listed_split_entries(train, test, cfg), member_fill(raw))
