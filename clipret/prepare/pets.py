"""The Oxford-IIIT Pet dataset from ``images.tar.gz`` and ``annotations.tar.gz`` into clipret's layout.

``annotations/trainval.txt`` and ``test.txt`` list ``<Breed_Name>_<n> class_id species breed_id``
per line (``#`` lines are comments); the image is ``images/<Breed_Name>_<n>.jpg``, copied as it
is. The class is the breed name (``Abyssinian``, ``american_bulldog``: 37 breeds). torchvision's
download keeps both in ``oxford-iiit-pet/``, which is looked in too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw, read_texts
from clipret.prepare.plan import Plan, listed_split_entries

__all__ = ["POLICY", "plan_pets"]

POLICY = ("official trainval/test lists (annotations/trainval.txt, test.txt); class = breed; the test images of each "
          "breed are drawn (seeded) into --query-per-class queries and the rest (or --gallery-per-class) gallery")


def _parse(lines: list[str], where: str) -> list[tuple[str, str]]:
    """(breed, image member name) of every list line."""
    out = []
    for line in lines:
        if line.startswith("#"):
            continue
        stem = line.split()[0]
        breed, _, number = stem.rpartition("_")
        if not breed or not number:
            raise ClipretError(f"{where}: expected '<Breed_Name>_<n> class species breed' lines, got {line!r}")
        out.append((breed, member_name(f"images/{stem}.jpg", where)))
    return out


def plan_pets(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of Oxford-IIIT Pet (``cfg``: seed, query_per_class, gallery_per_class, train_per_class)."""
    if (src / "oxford-iiit-pet").is_dir():
        src = src / "oxford-iiit-pet"
    images = open_raw(src, ["images.tar.gz", "images.tar"], "images", "oxford-pets")
    notes = open_raw(src, ["annotations.tar.gz", "annotations.tar"], "annotations", "oxford-pets")
    names = {split: f"annotations/{split}.txt" for split in ("trainval", "test")}
    texts = read_texts(notes, list(names.values()))
    train = _parse(texts[names["trainval"]], f"{notes.where}:{names['trainval']}")
    test = _parse(texts[names["test"]], f"{notes.where}:{names['test']}")
    return Plan("oxford-pets", listed_split_entries(train, test, cfg), member_fill(images))
