"""Benchmark data: Fashion-MNIST in clipret's dataset layout.

The exporter lives in the package (:mod:`clipret.prepare.idx` and :mod:`clipret.prepare.run`, the ``clipret prepare
fashion-mnist`` command); this module keeps the names the benchmark scripts import.
"""

from __future__ import annotations

from clipret.prepare.idx import (
    CLASS_NAMES,
    DEFAULT_DIRS,
    ENV_VAR,
    FILES,
    IdxFormatError,
    find_fashion_mnist,
    read_idx,
)
from clipret.prepare.run import export_fashion_mnist

__all__ = ["CLASS_NAMES", "DEFAULT_DIRS", "ENV_VAR", "FILES", "IdxFormatError", "export_fashion_mnist",
           "find_fashion_mnist", "read_idx"]
