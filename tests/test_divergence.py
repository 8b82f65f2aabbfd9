"""A step whose loss or gradient is not finite leaves the weights alone; a streak of them stops the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RN
from safetensors.torch import load_file

from clipret.config import TrainConfig
from clipret.errors import ClipretError


def _poison(mp: pytest.MonkeyPatch, bad_calls: set[int] | None) -> list[int]:
    """Make the objective's loss NaN on the given 0-based calls (every call when None); return the call log."""
    from clipret.train import losses

    calls: list[int] = []
    original = losses.Objective.__call__

    def call(self, emb, labels, epoch):
        loss, info = original(self, emb, labels, epoch)
        n = len(calls)
        calls.append(n)
        if bad_calls is None or n in bad_calls:
            loss = loss * float("nan")
        return loss, info

    mp.setattr(losses.Objective, "__call__", call)
    return calls


def _cfg(root, out) -> TrainConfig:
    return TrainConfig(root=str(root), out=str(out), model=str(TINY_RN), pretrained="none", image_size=32,
                       epochs=2, p=3, k=2, device="cpu", val_split=0.25, seed=1, workers=0)


def test_nonfinite_steps_are_skipped_and_the_run_finishes_finite(tiny_dataset, tmp_path):
    from clipret.train.loop import train

    events: list[tuple[str, dict]] = []
    with pytest.MonkeyPatch.context() as mp:
        calls = _poison(mp, {1, 2, 5})
        summary = train(_cfg(tiny_dataset, tmp_path / "run"), on_event=lambda k, p: events.append((k, p)))
    assert len(calls) == summary["steps"] >= 6
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # without the skip, NaN reaches every weight
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] is not None and r["train_loss"] == r["train_loss"] for r in rows)  # NaN != NaN
    assert [r["skipped_steps"] for r in rows] == [2, 1]  # 4 steps an epoch: calls 1, 2 | 5
    warned = [p["message"] for k, p in events if k == "warning" and "not finite" in p["message"]]
    assert len(warned) == 2  # one per streak: calls {1, 2} and {5}
    steps = [p for k, p in events if k == "step"]
    assert [p["finite"] for p in steps[:6]] == [True, False, False, True, True, False]


def test_a_streak_of_nonfinite_steps_stops_the_run_with_one_line(tiny_dataset, tmp_path, monkeypatch):
    from clipret.train import loop

    monkeypatch.setattr(loop, "MAX_NONFINITE_STEPS", 3)
    calls = _poison(monkeypatch, None)
    with pytest.raises(ClipretError, match=r"training diverged: .* 3 steps in a row \(up to step 3\)") as err:
        loop.train(_cfg(tiny_dataset, tmp_path / "run"))
    assert len(calls) == 3 and "\n" not in str(err.value) and "--lr" in str(err.value)


def test_cli_reports_a_skipped_step_and_an_epoch_without_a_finite_loss(tiny_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clipret.cli import app

    calls = _poison(monkeypatch, {0, 1, 2, 3})  # the whole first epoch (4 steps)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", tiny_dataset, "--out", out, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32,
        "--epochs", 2, "--p", 3, "--k", 2, "--workers", 0, "--device", "cpu", "--val-split", 0.25, "--seed", 1)])
    assert r.exit_code == 0, r.output
    assert len(calls) == 8 and "epoch 1: loss –" in r.output and "skipped the update of step 1" in r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and rows[1]["train_loss"] > 0


def test_a_skipped_first_step_does_not_make_pytorch_warn_about_the_scheduler_order(tiny_dataset, tmp_path):
    """The schedule moves on over a skipped step, so that the LR of step n never depends on how many
    steps were skipped; on the very first step PyTorch took that for a scheduler called before its
    optimizer and printed a misleading warning."""
    import warnings

    from clipret.train.loop import train

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _poison(mp, {0})
        train(_cfg(tiny_dataset, tmp_path / "run"))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] == 1  # the first step was indeed skipped
