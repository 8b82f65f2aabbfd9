"""bench/clip_finetune.py on a tiny random-init config and fake CIFAR-100 binary files, so the GPU
script cannot rot; and its fast, one-line failures where the weights or the data are missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clip_finetune import CIFAR_RECORD, read_cifar100
from conftest import ROOT, TINY_VIT

SCRIPT = ROOT / "bench" / "clip_finetune.py"


def _fake_cifar(data: Path, classes: int = 4, train: int = 8, test: int = 6) -> None:
    """CIFAR-100 binary records: class-coloured 32 px images with noise, fine labels 0..classes-1."""
    rng = np.random.default_rng(0)
    folder = data / "cifar-100-binary"
    folder.mkdir(parents=True)
    for split, n in (("train", train), ("test", test)):
        labels = np.repeat(np.arange(classes), n)
        planes = rng.integers(0, 60, (len(labels), 3, 32, 32)) + (labels * 50)[:, None, None, None]
        rec = np.concatenate([np.zeros((len(labels), 1)), labels[:, None], planes.reshape(len(labels), -1)], axis=1)
        rec.astype(np.uint8).tofile(folder / f"{split}.bin")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_read_cifar100_parses_records_without_unpickling(tmp_path):
    _fake_cifar(tmp_path, classes=3, train=2, test=1)
    x, y = read_cifar100(tmp_path, "train")
    raw = np.fromfile(tmp_path / "cifar-100-binary" / "train.bin", dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    assert x.shape == (6, 32, 32, 3) and y.tolist() == [0, 0, 1, 1, 2, 2]
    # pixel (row 5, col 7) of image 4, green plane: byte 2 + 1024 + 5 * 32 + 7 of its record
    assert x[4, 5, 7, 1] == raw[4, 2 + 1024 + 5 * 32 + 7]


@pytest.mark.slow
def test_tiny_end_to_end_prints_the_three_rows(tmp_path):
    _fake_cifar(tmp_path / "data")
    r = _run("--dataset", "cifar100", "--data", str(tmp_path / "data"), "--model", str(TINY_VIT), "--pretrained", "none",
             "--epochs", "1", "--train-per-class", "8", "--query-per-class", "2", "--gallery-per-class", "4",
             "--device", "cpu", "--work", str(tmp_path / "work"),
             "--train-arg=--p", "--train-arg=4", "--train-arg=--k", "--train-arg=2", "--train-arg=--workers",
             "--train-arg=0", "--train-arg=--image-size", "--train-arg=32")
    assert r.returncode == 0, r.stdout + r.stderr
    table = json.loads((tmp_path / "work" / "cifar100-closed-s0" / "table.json").read_text())
    assert table["summary"] == {"dataset": "cifar100", "protocol": "closed", "classes": 100,
                                "n_train": 32, "n_query": 8, "n_gallery": 16}
    assert list(table["rows"]) == ["zero-shot (CLIP's own embedding)", "fine-tuned (clipret train)",
                                   "fine-tuned + --tta flip --rerank --qe"]
    for name, m in table["rows"].items():
        assert f"| {name} | {m['recall@1']:.3f} |" in r.stdout
        assert all(0.0 <= m[k] <= 1.0 for k in ("recall@1", "map@r", "map"))
    assert (tmp_path / "work" / "cifar100-closed-s0" / "run" / "model.safetensors").is_file()


def test_missing_data_fails_fast_in_one_line(tmp_path):
    r = _run("--dataset", "cifar100", "--data", str(tmp_path), "--model", str(TINY_VIT), "--pretrained", "none",
             "--work", str(tmp_path / "work"), timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "CIFAR-100 not found" in r.stderr and "cifar-100-binary" in r.stderr
    r = _run("--dataset", "food101", "--data", str(tmp_path), "--model", str(TINY_VIT), "--pretrained", "none",
             "--work", str(tmp_path / "work"), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Food-101 not found" in r.stderr


def test_missing_weights_fail_fast_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    r = _run("--dataset", "cifar100", "--data", str(tmp_path / "nothing-here"), "--model", "ViT-B-32",
             "--pretrained", "openai", "--work", str(tmp_path / "work"), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "openai" in r.stderr and "CIFAR" not in r.stderr  # the weights are checked first
    assert not (tmp_path / "work").exists()
