"""What ``clipret prepare`` writes: a plan of entries, and the split rules every converter shares.

An :class:`Entry` is one output image: its path under ROOT (``training/<class>/<file>``,
``test/query/<class>/<file>`` or ``test/gallery/<class>/<file>``), its label, and the key its
source reads it by (an archive member name, an array row). A :class:`Plan` is every entry of
one dataset plus ``fill``, which yields the encoded bytes of the entries asked for, in whatever
order the source reads fastest (a tar archive is read once, front to back).

Per-class draws use ``numpy.random.default_rng([seed, crc32(label)])``: a class's split does
not depend on which other classes exist, and the same seed gives the same split.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipret.errors import ClipretError

__all__ = ["Entry", "Plan", "SPLITS", "safe_component", "class_rng", "subsample", "split_query_gallery", "group_by_label",
           "entries"]

SPLITS = {"training": "training", "query": "test/query", "gallery": "test/gallery"}


@dataclass(frozen=True)
class Entry:
    """One output image: ``dest`` under ROOT (POSIX), its ``label``, and its source's ``key``."""

    dest: str
    label: str
    key: Any

    @property
    def split(self) -> str:
        """``training``, ``query`` or ``gallery``."""
        return "training" if self.dest.startswith("training/") else self.dest.split("/")[1]

    @property
    def id(self) -> str:
        """The id as ``clipret embed`` gives it: the path under its split folder (``<class>/<file>``)."""
        return self.dest.split("/", 1 if self.split == "training" else 2)[-1]


Fill = Callable[[Sequence[Entry]], Iterator[tuple[Entry, bytes]]]


@dataclass
class Plan:
    """Every entry of a dataset, how to fill them, and how its test set is used.

    ``shared_test``: the benchmark protocol. Test images are written once under ``test/gallery``;
    ``test/query`` is a relative link to it, so every test image is a query and each query's own
    image is left out of its ranking (the self-match rule).
    """

    dataset: str
    entries: list[Entry]
    fill: Fill
    shared_test: bool = False

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for e in self.entries:
            if e.dest in seen:
                raise ClipretError(f"{self.dataset}: two source images map to {e.dest}; the raw files are malformed")
            seen.add(e.dest)
        if self.shared_test and any(e.split == "query" for e in self.entries):
            raise ClipretError(f"{self.dataset}: a shared test set has no separate queries")

    def counts(self) -> dict[str, int]:
        """Images per split: {"training": n, "query": n, "gallery": n} (shared test: query = gallery)."""
        out = {split: 0 for split in SPLITS}
        for e in self.entries:
            out[e.split] += 1
        if self.shared_test:
            out["query"] = out["gallery"]
        return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_component(text: str) -> str:
    """A label or file name made safe as one path component: runs of other characters -> ``_``.

    ``"Ram C/V Cargo Van"`` -> ``"Ram_C_V_Cargo_Van"``; an empty, ``.`` or ``..`` result (or one
    starting with a dot, which clipret would hide) is an error, not a guess.
    """
    out = _UNSAFE.sub("_", text.strip()).strip("_")
    if not out or out.startswith("."):
        raise ClipretError(f"cannot make a folder or file name of {text!r}; the raw files are malformed")
    return out


def class_rng(seed: int, label: str) -> np.random.Generator:
    """The generator of one class's draws: ``default_rng([seed, crc32(label)])``."""
    return np.random.default_rng([int(seed), zlib.crc32(label.encode("utf-8"))])


def group_by_label(labels: Sequence[str]) -> dict[str, list[int]]:
    """{label: positions of that label in ``labels``, ascending}, labels sorted."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return dict(sorted(groups.items()))


def subsample(labels: Sequence[str], per_class: int | None, seed: int, what: str = "training") -> list[int]:
    """Positions of at most ``per_class`` items of each label (all when None), drawn per class, ascending."""
    if per_class is None:
        return list(range(len(labels)))
    if per_class < 1:
        raise ClipretError(f"{what} images per class must be at least 1, got {per_class}")
    keep: list[int] = []
    for label, idx in group_by_label(labels).items():
        keep += [idx[j] for j in class_rng(seed, label + "/" + what).permutation(len(idx))[:per_class]]
    return sorted(keep)


def split_query_gallery(labels: Sequence[str], n_query: int, seed: int, n_gallery: int | None = None,
                        classes: Collection[str] | None = None) -> tuple[list[int], list[int]]:
    """Split test items per class: (query positions, gallery positions), each ascending.

    Each class's items are shuffled by :func:`class_rng`; the first ``n_query`` are queries, the
    next ``n_gallery`` (all the rest when None) the gallery. A class needs ``n_query + 1`` items
    (every query needs a gallery image of its class). ``classes``: split only these labels.
    """
    if n_query < 1 or (n_gallery is not None and n_gallery < 1):
        raise ClipretError(f"queries and gallery images per class must be at least 1 (got {n_query}, {n_gallery})")
    query: list[int] = []
    gallery: list[int] = []
    for label, idx in group_by_label(labels).items():
        if classes is not None and label not in classes:
            continue
        need = n_query + (n_gallery or 1)
        if len(idx) < need:
            raise ClipretError(f"class {label} has {len(idx)} test images, fewer than the {need} needed for "
                               f"{n_query} queries and {n_gallery or 'at least 1'} gallery image(s); lower --query-per-class")
        order = [idx[j] for j in class_rng(seed, label).permutation(len(idx))]
        query += order[:n_query]
        gallery += order[n_query:] if n_gallery is None else order[n_query:n_query + n_gallery]
    return sorted(query), sorted(gallery)


def entries(split: str, items: Iterable[tuple[str, str, Any]]) -> list[Entry]:
    """Entries of one split from (label, file name, key): ``<split folder>/<class>/<file name>``.

    The class folder is the label made safe (:func:`safe_component`), and it is the entry's label
    too, so labels.csv and the class folders that ``clipret train`` reads always agree.
    """
    folder, out = SPLITS[split], []
    for label, name, key in items:
        cls = safe_component(label)
        out.append(Entry(f"{folder}/{cls}/{safe_component(name)}", cls, key))
    return out


def listed_split_entries(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]],
                         cfg: Mapping[str, Any]) -> list[Entry]:
    """Entries of a dataset shipped as (label, archive member) lists for its official train and
    test splits: ``cfg['train_per_class']`` training images per class, and the test images split
    per class into ``query_per_class`` queries and ``gallery_per_class`` gallery images (seeded)."""
    keep = subsample([label for label, _ in train], cfg["train_per_class"], cfg["seed"])
    query, gallery = split_query_gallery([label for label, _ in test], cfg["query_per_class"], cfg["seed"],
                                         cfg["gallery_per_class"])

    def items(rows: Sequence[tuple[str, str]], idx: list[int]) -> list[tuple[str, str, str]]:
        return [(rows[i][0], rows[i][1].rsplit("/", 1)[1], rows[i][1]) for i in idx]

    return entries("training", items(train, keep)) + entries("query", items(test, query)) + entries("gallery", items(test, gallery))
