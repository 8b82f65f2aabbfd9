"""Smoke tests for bench/embed.py and bench/train.py at a tiny size, so the scripts cannot rot.

They check that each script runs end to end on the CPU and that what it
reports is coherent (no timing is asserted): the naive loop and ``clipret
embed`` agree row for row, and grad checkpointing reaches every block of
clipret's token tower.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_VIT

BENCH = ROOT / "bench"


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_make_photo_is_deterministic_and_sized() -> None:
    from embed import make_photo

    a, b = make_photo(3, seed=1, width=64, height=48), make_photo(3, seed=1, width=64, height=48)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(make_photo(4, seed=1, width=64, height=48)))
    assert np.asarray(a).std() > 5  # not a flat image


@pytest.mark.slow
def test_embed_bench_runs_and_both_sides_agree(tmp_path: Path) -> None:
    out = tmp_path / "embed.json"
    r = _run([str(BENCH / "embed.py"), "--model-preset", "tiny", "--n", "3", "--width", "320", "--height", "240",
              "--batch-size", "2", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert "ratio naive / clipret" in r.stdout
    res = json.loads(out.read_text())
    assert res["rows_naive"] == res["rows_clipret"] == res["rows_compared"] == 3
    assert res["cosine_min"] > 0.9999  # same seeded weights, same preprocessing: the same embeddings
    assert res["ratio_naive_over_clipret"] == pytest.approx(res["naive_s"] / res["clipret_s"])
    assert len(list((tmp_path / "cache").glob("*/*.jpg"))) == 3


@pytest.mark.slow
def test_train_bench_runs_and_checkpointing_reaches_every_block(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    r = _run([str(BENCH / "train.py"), "--model-preset", "tiny", "--device", "cpu", "--p", "2", "--k", "2",
              "--steps", "1", "--warmup-steps", "0", "--image-size", "32", "--n-images", "60", "--n-classes", "6",
              "--variants", "fp32,ckpt", "--in-process", "--json", str(out)])
    assert "sampler/bare" in r.stdout
    res = json.loads(out.read_text())
    rows = {row["variant"]: row for row in res["rows"]}
    assert set(rows) == {"fp32", "ckpt"}
    assert not any("error" in row for row in rows.values()), rows
    for row in rows.values():
        assert row["img_s"] > 0 and row["bare_s"] > 0 and row["loss_s"] > 0 and row["miner_s"] > 0
    layers = json.loads(TINY_VIT.read_text())["vision_cfg"]["layers"]
    assert rows["ckpt"]["ckpt"]["blocks"] == rows["ckpt"]["ckpt"]["checkpointed"] == layers
    assert res["sampler"]["per_batch_s"] > 0 and res["sampler"]["batches_per_epoch"] == -(-60 // 4)


def test_gpu_run_script_is_valid_bash() -> None:
    r = subprocess.run(["bash", "-n", str(BENCH / "gpu_run.sh")], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_before_after_runs_both_sides_interleaved_and_reports_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "ba.json"
    r = _run([str(BENCH / "before_after.py"), "--old", str(ROOT), "--rounds", "2", "--json", str(out), "--", "index", "--help"])
    sides = [line.split()[2].rstrip(":") for line in r.stdout.splitlines() if line.startswith("round")]
    assert sides == ["new", "old", "old", "new"]  # interleaved, so a drift of the machine hits both
    res = json.loads(out.read_text())
    new, old = sorted(res["times"]["new"]), sorted(res["times"]["old"])
    assert res["ratio_new_over_old"] == pytest.approx((new[0] + new[1]) / (old[0] + old[1]))
    assert f"ratio new / old {res['ratio_new_over_old']:.3f}" in r.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "before_after.py"), "--old", str(ROOT), "--rounds", "1", "--",
                          "index", "--no-such-flag"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "failed" in bad.stderr  # a failing command is reported, never timed


def test_report_size_bench_writes_and_measures_a_report() -> None:
    r = _run([str(BENCH / "report_size.py"), "--queries", "300", "--gallery", "40", "--photos", "6", "--no-browser"])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("300 queries x 40 gallery items"))
    assert float(line.split(": ")[1].split(" MB")[0]) > 0  # a page was written and measured
