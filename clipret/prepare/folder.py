"""``clipret prepare folder SRC ROOT``: a plain class-folder tree (``SRC/<class>/*``, ImageFolder) into the layout.

Two splits, as the field uses both:

* open set (``--test-classes``): whole classes are held out for testing, the others train;
* closed set (``--test-fraction F``): every class gives F × its images, rounded half up, to
  testing (at least one image of each class stays in training).

The test images of each class are then split into queries (``--query-fraction Q`` of them,
at least 1 and leaving at least 1 gallery image) and gallery; a class with a single test image
puts it in the gallery. Draws are per class, from ``default_rng([seed, crc32(class)])``. Files
are copied byte for byte and keep their paths below the class folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clipret.data.layout import folder_labels, scan_images
from clipret.errors import ClipretError
from clipret.prepare.plan import SPLITS, Entry, Plan, class_rng, group_by_label

__all__ = ["POLICY", "plan_folder", "resolve_classes", "folder_settings"]

POLICY = ("open set (--test-classes: those classes are held out for testing) or closed set (--test-fraction F of "
          "every class's images to testing); test images of each class split into --query-fraction queries and the "
          "rest gallery, seeded")


def resolve_classes(spec: str, classes: Sequence[str], order: str = "sorted") -> list[str]:
    """``--test-classes``: a comma list of class names, or a count N = the last N of ``classes`` (in ``order``)."""
    text = spec.strip()
    if text.isdigit():
        n = int(text)
        if not 1 <= n < len(classes):
            raise ClipretError(f"--test-classes {n}: hold out between 1 and {len(classes) - 1} of the {len(classes)} classes")
        return list(classes[-n:])
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        shown = ", ".join(list(classes)[:8]) + (" ..." if len(classes) > 8 else "")
        raise ClipretError(f"--test-classes: no class {unknown[0]!r} (classes, in {order} order: {shown})")
    if not wanted or len(set(wanted)) >= len(classes):
        raise ClipretError(f"--test-classes must name at least 1 and at most {len(classes) - 1} of the {len(classes)} classes")
    return sorted(set(wanted), key=list(classes).index)


def _scan(src: Path) -> dict[str, list[str]]:
    """{class: its ids (``<class>/<path>``), sorted} of ``src``."""
    ids, _ = scan_images(src)
    labels = folder_labels(ids)
    loose = [i for i in ids if i not in labels]
    if loose:
        raise ClipretError(f"{len(loose)} images sit directly in {src} (e.g. {loose[0]}); put each in a <class>/ subfolder")
    groups = group_by_label([labels[i] for i in ids])
    if len(groups) < 2:
        raise ClipretError(f"{src} has {len(groups)} class folder(s); a split needs at least 2 classes")
    return {label: [ids[j] for j in idx] for label, idx in groups.items()}


def folder_settings(src: Path, test_classes: str | None, test_fraction: float | None, query_fraction: float | None,
                    seed: int) -> dict[str, Any]:
    """The settings of a folder split (what ``prepare.json`` records); checks the options."""
    if (test_classes is None) == (test_fraction is None):
        raise ClipretError("prepare folder needs exactly one of --test-classes (open set) or --test-fraction (closed set)")
    q = 0.5 if query_fraction is None else query_fraction
    if not 0 < q < 1:
        raise ClipretError(f"--query-fraction must lie strictly between 0 and 1, got {q}")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ClipretError(f"--test-fraction must lie strictly between 0 and 1, got {test_fraction}")
    if not src.is_dir():
        raise ClipretError(f"SRC folder not found: {src}")
    held = resolve_classes(test_classes, sorted(_scan(src))) if test_classes is not None else None
    return {"source": str(src.resolve()), "test_classes": held, "test_fraction": test_fraction, "query_fraction": q,
            "seed": seed}


def _n_query(n_test: int, q: float) -> int:
    return 0 if n_test < 2 else min(max(math.floor(q * n_test), 1), n_test - 1)


def plan_folder(src: Path, cfg: dict[str, Any]) -> Plan:
    """The plan of a folder split with the :func:`folder_settings` ``cfg``."""
    held = set(cfg["test_classes"] or [])
    out: list[Entry] = []
    for label, ids in _scan(src).items():
        order = [ids[j] for j in class_rng(cfg["seed"], label).permutation(len(ids))]
        if cfg["test_fraction"] is None:
            n_test = len(ids) if label in held else 0
        else:
            n_test = min(math.floor(cfg["test_fraction"] * len(ids) + 0.5), len(ids) - 1)  # half up
        n_query = _n_query(n_test, cfg["query_fraction"])
        for pos, image_id in enumerate(order):
            split = "query" if pos < n_query else "gallery" if pos < n_test else "training"
            out.append(Entry(f"{SPLITS[split]}/{image_id}", label, image_id))
    out.sort(key=lambda e: e.dest)

    def fill(todo: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        for e in todo:
            yield e, (src / e.key).read_bytes()

    return Plan("folder", out, fill)
