"""In-Shop Clothes Retrieval (DeepFashion) from ``img.zip`` and ``list_eval_partition.txt``, the official lists.

``list_eval_partition.txt`` (in the source folder or its ``Eval/``) starts with a count and the
header ``image_name item_id evaluation_status``; each row is
``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train|query|gallery``. The class is
the item (``id_00000002``). Query and gallery are the official, distinct lists: real folders,
no self-matches. A file is named by its path below ``img/`` without the item folder
(``WOMEN_Dresses_02_1_front.jpg``), copied as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare.archive import member_fill, member_name, open_raw
from clipret.prepare.plan import Plan, entries, subsample

__all__ = ["POLICY", "LIST", "plan_inshop", "read_partition"]

LIST = "list_eval_partition.txt"
POLICY = ("official lists (list_eval_partition.txt: 3997 items, 25882 images train; 3985 items, 14218 queries "
          "and 12612 gallery images); class = item id")
_STATUS = {"train": "training", "query": "query", "gallery": "gallery"}


def read_partition(path: Path) -> list[tuple[str, str, str]]:
    """(split, item id, image member) of every row of ``list_eval_partition.txt``."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].isdigit() or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise ClipretError(f"{path}: expected a count, then the header 'image_name item_id evaluation_status'")
    rows = []
    for line in lines[2:]:
        parts = line.split()
        if len(parts) != 3 or parts[2] not in _STATUS:
            raise ClipretError(f"{path}: expected 'image_name item_id train|query|gallery' rows, got {line!r}")
        rows.append((_STATUS[parts[2]], parts[1], member_name(parts[0], path)))
    if len(rows) != int(lines[0]):
        raise ClipretError(f"{path}: its first line says {lines[0]} rows but {len(rows)} follow; the file is truncated")
    return rows


def _file_name(member: str) -> str:
    parts = member.split("/")
    return "_".join(parts[1:-2] + parts[-1:]) if len(parts) > 2 else parts[-1]


def plan_inshop(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of In-Shop (``cfg``: seed, train_per_class)."""
    found = [p for p in (src / LIST, src / "Eval" / LIST) if p.is_file()]
    if not found:
        raise ClipretError(f"{src} has no {LIST} (nor Eval/{LIST}): pass --source DIR holding img.zip and {LIST}")
    raw = open_raw(src, ["img.zip"], "img", "inshop")
    rows = read_partition(found[0])
    parts: dict[str, list[tuple[str, str, str]]] = {"training": [], "query": [], "gallery": []}
    for split, item, member in rows:
        parts[split].append((item, _file_name(member), member))
    keep = subsample([c for c, _, _ in parts["training"]], cfg["train_per_class"], cfg["seed"])
    plan = entries("training", [parts["training"][i] for i in keep])
    plan += entries("query", parts["query"]) + entries("gallery", parts["gallery"])
    return Plan("inshop", plan, member_fill(raw))
