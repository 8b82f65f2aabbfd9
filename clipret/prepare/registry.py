"""The datasets ``clipret prepare`` knows: NAME -> raw files, split policy, converter, options.

Every converter is ``build(source folder, settings) -> Plan``; ``settings`` is the dict that
``prepare.json`` records (a rerun with other settings is refused). Options that do not apply to
a dataset are refused rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from clipret.errors import ClipretError
from clipret.prepare import cars, cifar, cub, food101, idx, inshop, pets, sop
from clipret.prepare import folder as folder_split
from clipret.prepare.plan import Plan

__all__ = ["PrepareOptions", "DatasetSpec", "DATASETS", "get_spec", "settings_for", "FLAGS"]

DEFAULT_QUERY_PER_CLASS = 10


@dataclass
class PrepareOptions:
    """The options of ``clipret prepare``; None means the dataset's default."""

    seed: int = 0
    query_per_class: int | None = None
    gallery_per_class: int | None = None
    train_per_class: int | None = None
    size: int | None = None
    test_classes: str | None = None
    test_fraction: float | None = None
    query_fraction: float | None = None


FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(PrepareOptions)}
_SPLIT = frozenset({"query_per_class", "gallery_per_class", "train_per_class"})
_BENCH = frozenset({"train_per_class"})


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what --source must hold, how it is split, and the options it takes besides --seed."""

    name: str
    title: str
    raw: str
    policy: str
    shared_test: bool
    options: frozenset[str]
    build: Callable[[Path, dict[str, Any]], Plan]
    default_source: Callable[[], Path | None] | None = None


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("fashion-mnist", "Fashion-MNIST", "the four idx files, raw or .gz (train-images-idx3-ubyte[.gz], ...)",
                idx.POLICY, False, _SPLIT | {"size", "test_classes"}, idx.plan_fashion_mnist, idx.find_fashion_mnist),
    DatasetSpec("cifar100", "CIFAR-100", "cifar-100-python.tar.gz (or its extracted cifar-100-python/)", cifar.POLICY, False,
                _SPLIT | {"size"}, cifar.plan_cifar100),
    DatasetSpec("food101", "Food-101", "food-101.tar.gz (or its extracted food-101/)", food101.POLICY, False, _SPLIT,
                food101.plan_food101),
    DatasetSpec("oxford-pets", "Oxford-IIIT Pet", "images.tar.gz and annotations.tar.gz (or images/ and annotations/)",
                pets.POLICY, False, _SPLIT, pets.plan_pets),
    DatasetSpec("cub200", "CUB-200-2011", "CUB_200_2011.tgz (or its extracted CUB_200_2011/)", cub.POLICY, True, _BENCH,
                cub.plan_cub200),
    DatasetSpec("cars196", "Cars-196", "car_ims.tgz (or car_ims/) and cars_annos.mat", cars.POLICY, True, _BENCH,
                cars.plan_cars196),
    DatasetSpec("sop", "Stanford Online Products", "Stanford_Online_Products.zip (or its extracted folder)", sop.POLICY, True,
                _BENCH, sop.plan_sop),
    DatasetSpec("inshop", "In-Shop Clothes Retrieval", "img.zip (or img/) and list_eval_partition.txt (or Eval/...)",
                inshop.POLICY, False, _BENCH, inshop.plan_inshop),
    DatasetSpec("folder", "a class-folder tree (ImageFolder)", "SRC/<class>/* images", folder_split.POLICY, False,
                frozenset({"test_classes", "test_fraction", "query_fraction"}), folder_split.plan_folder),
]}


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in DATASETS:
        raise ClipretError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_options(spec: DatasetSpec, opts: PrepareOptions) -> None:
    for f in fields(PrepareOptions):
        if f.name != "seed" and getattr(opts, f.name) is not None and f.name not in spec.options:
            takes = ", ".join(FLAGS[o] for o in sorted(spec.options)) or "no options besides --seed"
            raise ClipretError(f"{FLAGS[f.name]} does not apply to {spec.name} (it takes {takes})")
    for name in ("query_per_class", "gallery_per_class", "train_per_class", "size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ClipretError(f"{FLAGS[name]} must be at least 1, got {value}")
    if opts.seed < 0:
        raise ClipretError(f"--seed must be non-negative, got {opts.seed}")


def settings_for(spec: DatasetSpec, opts: PrepareOptions, src: Path | None = None) -> dict[str, Any]:
    """The settings ``spec`` is prepared with (recorded in ``prepare.json``); checks ``opts`` first."""
    _check_options(spec, opts)
    if spec.name == "folder":
        if src is None:
            raise ClipretError("prepare folder needs SRC: clipret prepare folder SRC ROOT --test-fraction 0.2")
        return folder_split.folder_settings(src, opts.test_classes, opts.test_fraction, opts.query_fraction, opts.seed)
    query = opts.query_per_class or DEFAULT_QUERY_PER_CLASS
    if spec.name == "fashion-mnist":
        test = None
        if opts.test_classes is not None:
            held = folder_split.resolve_classes(opts.test_classes, list(idx.CLASS_NAMES), "label")
            test = [idx.CLASS_NAMES.index(c) for c in held]
        train = None if test is None else [c for c in range(len(idx.CLASS_NAMES)) if c not in test]
        return idx.settings(train_per_class=opts.train_per_class, query_per_class=query,
                            gallery_per_class=opts.gallery_per_class, seed=opts.seed, size=opts.size,
                            train_classes=train, test_classes=test)
    cfg: dict[str, Any] = {"seed": opts.seed, "train_per_class": opts.train_per_class}
    if "query_per_class" in spec.options:
        cfg.update(query_per_class=query, gallery_per_class=opts.gallery_per_class)
    if "size" in spec.options:
        cfg["size"] = opts.size
    return cfg
