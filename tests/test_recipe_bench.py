"""bench/recipe.py: the training-recipe ablation and fine-tuning proxy, run --quick on fake
Fashion-MNIST idx files (so it cannot rot), its resumption from the cache, and the target checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from recipe import DEFAULT, ROWS, targets, verdict
from test_postprocess_bench import _fake_patterns


def _rec(r1: float, mapr: float, train_s: float = 100.0) -> dict:
    return {"recall@1": r1, "map@r": mapr, "map": mapr, "train_s": train_s}


def test_every_ablation_row_changes_one_recipe_piece_from_the_defaults():
    from clipret.config import TrainConfig

    fields = set(TrainConfig().to_dict())
    assert ROWS[0].name == DEFAULT and ROWS[0].train == {}
    assert len({r.name for r in ROWS}) == len(ROWS)
    for row in ROWS[1:]:
        assert set(row.train) <= fields, row.name
        assert row.train or row.tta, row.name  # a row that changes nothing would compare the default with itself


def test_no_ablation_row_computes_what_the_default_computes_on_the_benchmark_inputs():
    # e.g. "aug: off" without the flip, or "LLRD 1" from random init, are the default at 32 px on gray images
    from recipe import effective

    train = {"epochs": 12, "lr": 1e-3, "p": 10, "k": 8}
    default = effective(ROWS[0], train)
    assert default["aug"]["flip"] and not default["aug"]["crop"] and default["llrd"] == 1.0
    seen = [default]
    for row in ROWS[1:]:
        mine = effective(row, train)
        assert mine not in seen, row.name
        seen.append(mine)
    assert effective(next(r for r in ROWS if r.name == "aug: off"), train)["aug"] == {
        "crop": False, "flip": False, "color_jitter": 0.0, "grayscale": 0.0, "erasing": 0.0, "crop_scale": 0.5}


def test_a_row_is_better_or_worse_only_beyond_its_std_and_the_noise_floor():
    assert verdict(0.0003, 0.0001) == "within noise"  # tiny but steady: two seeds say little about the std
    assert verdict(-0.009, 0.001) == "within noise"
    assert verdict(0.03, 0.04) == "within noise"
    assert verdict(0.016, 0.003) == "better"
    assert verdict(-0.059, 0.005) == "worse"


def test_targets_are_checked_on_every_seed():
    closed = {DEFAULT: {0: _rec(0.86, 0.6), 1: _rec(0.84, 0.6)}}
    assert dict(targets(closed, None, None))["closed set, default recipe: R@1 >= 0.85 and MAP@R >= 0.55 on every seed"] is False
    closed[DEFAULT][1] = _rec(0.85, 0.55, train_s=601)
    got = dict(targets(closed, None, None))
    assert got["closed set, default recipe: R@1 >= 0.85 and MAP@R >= 0.55 on every seed"] is True
    assert got["closed set: training <= 600 s on every seed"] is False
    open_ = {DEFAULT: {0: _rec(0.5, 0.62)}, "raw pixels": {0: _rec(0.6, 0.52)}}
    assert dict(targets(None, open_, None))["open set: MAP@R >= raw pixels + 0.10 on every seed"] is True
    ft = ({"fine-tuned (default)": {0: _rec(0.9, 0.7)}, "pretrained embedding": {0: _rec(0.8, 0.61)}},
          {0: {"never_below": True}})
    got = dict(targets(None, None, ft))
    assert got["fine-tuning proxy: MAP@R >= pretrained embedding + 0.10 on every seed"] is False
    assert got["fine-tuning proxy: no epoch's validation MAP@R below the starting weights'"] is True


@pytest.mark.slow
def test_quick_run_prints_every_table_and_resumes_from_the_cache(tmp_path: Path) -> None:
    src = _fake_patterns(tmp_path / "idx", train_per_class=16, test_per_class=12)
    cmd = [sys.executable, str(ROOT / "bench" / "recipe.py"), "--quick", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "r.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "CLIPRET_FASHION_MNIST": str(src), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for heading in ("### closed set", "### open set", "### fine-tuning proxy"):
        assert heading in r.stdout
    for name in ("raw pixels", "untrained network", DEFAULT, "head: no BatchNorm", "loss: ArcFace", "+ flip TTA",
                 "pretrained embedding", "random init, same budget", "fine-tuned (default)"):
        assert f"| {name} |" in r.stdout, name
    assert r.stdout.count("target ") == 5
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(0.0 <= x["map@r"] <= 1.0 for x in recs)
    # the fine-tune started from a run of the work folder (the open-set one), not from random init
    tuned = next(x for x in recs if x["row"] == "fine-tuned (default)")
    config = json.loads((tmp_path / "work" / "runs" / tuned["run"] / "config.json").read_text())
    assert Path(config["model"]["pretrained"]).parent.name == "runs"
    again = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, env=env)
    assert again.returncode == 0 and " seed 0 " not in again.stdout  # every row came from the cache
    assert again.stdout.split("### closed set")[1] == r.stdout.split("### closed set")[1]
    # the cache, not the run folders, is the record: rows scored earlier are not retrained when their runs are gone
    gone = [run for run in (tmp_path / "work" / "runs").iterdir() if run.name.startswith("closed-")]
    assert gone
    for run in gone:
        shutil.rmtree(run)
    third = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, env=env)
    assert third.returncode == 0 and " seed 0 " not in third.stdout, third.stdout + third.stderr
    assert not any((tmp_path / "work" / "runs" / run.name).exists() for run in gone)
    assert third.stdout.split("### closed set")[1] == r.stdout.split("### closed set")[1]


def test_model_option_trains_and_scores_that_network(tmp_path: Path) -> None:
    """``--model CONFIG`` swaps the network of every row (the trained runs and the untrained
    reference), and keys the cache by the config's content: the ViT's rows are not reused."""
    from conftest import TINY_RN

    src = _fake_patterns(tmp_path / "idx", train_per_class=16, test_per_class=12)
    base = [sys.executable, str(ROOT / "bench" / "recipe.py"), "--quick", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "r.jsonl"), "--protocols", "closed", "--rows", "default", "--no-finetune"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "CLIPRET_FASHION_MNIST": str(src), "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--model", str(TINY_RN)]):
        r = subprocess.run(base + extra, capture_output=True, text=True, check=False, timeout=300, env=env)
        assert r.returncode == 0 and " seed 0 " in r.stdout, r.stdout + r.stderr  # trained and scored anew
    runs = {json.loads((run / "config.json").read_text())["model"]["clip_config"]["vision_cfg"]["layers"].__class__
            for run in (tmp_path / "work" / "runs").iterdir()}
    assert runs == {int, list}  # a ViT (layers: 4) and a ResNet (layers: [1, 1, 1, 1]) run
    untrained = sorted(p.name for p in (tmp_path / "work" / "untrained").iterdir())
    assert len(untrained) == 2 and untrained[0] == "closed-s0", untrained
    bad = subprocess.run(base + ["--model", str(tmp_path / "missing.json")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no such file" in bad.stderr
