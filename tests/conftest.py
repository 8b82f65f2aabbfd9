"""Shared fixtures: a tiny drawn dataset and the bundled tiny model configs.

Tests run on the CPU unless CLIPRET_TEST_DEVICE says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "clipret" / "configs"
sys.path.insert(0, str(ROOT / "bench"))  # benchmark-only helpers (e.g. the Fashion-MNIST exporter) are tested too
TINY_VIT = CONFIGS / "tiny-vit.json"
TINY_RN = CONFIGS / "tiny-rn.json"
DEVICE = os.environ.get("CLIPRET_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes × 8 training images, 2 query and 4 gallery images per class, 32 px."""
    from clipret.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    make_synthetic_dataset(root, n_classes=4, train_per_class=8, query_per_class=2, gallery_per_class=4, image_size=32, seed=3)
    return root


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the image-check cache out of the user's home during tests."""
    os.environ["CLIPRET_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def invoke_cli(*args: object, code: int = 0):
    """Run ``clipret ARGS`` in-process; assert its exit code (the output in the message); return the result."""
    from typer.testing import CliRunner

    from clipret.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r
