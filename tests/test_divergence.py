"""A step whose loss, gradient or BatchNorm statistics are not finite leaves the model alone; a streak
of them stops the run; held-out embeddings that are not finite fail the epoch, which is never exported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_RN
from safetensors.torch import load_file

from clipret.config import TrainConfig
from clipret.errors import ClipretError


def _poison(mp: pytest.MonkeyPatch, bad_calls: set[int] | None) -> list[int]:
    """Make the objective's loss NaN on the given 0-based calls (every call when None); return the call log."""
    from clipret.training import losses

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


def _cli_train(root, out):
    """``clipret train`` with the settings of :func:`_cfg`."""
    from typer.testing import CliRunner

    from clipret.cli import app

    return CliRunner().invoke(app, [str(a) for a in (
        "train", root, "--out", out, "--model", TINY_RN, "--pretrained", "none", "--image-size", 32,
        "--epochs", 2, "--p", 3, "--k", 2, "--workers", 0, "--device", "cpu", "--val-split", 0.25, "--seed", 1)])


def test_nonfinite_steps_are_skipped_and_the_run_finishes_finite(tiny_dataset, tmp_path):
    from clipret.training.loop import train

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
    from clipret.training import loop, step

    monkeypatch.setattr(step, "MAX_NONFINITE_STEPS", 3)
    calls = _poison(monkeypatch, None)
    with pytest.raises(ClipretError, match=r"training diverged: .* 3 steps in a row \(up to step 3\)") as err:
        loop.train(_cfg(tiny_dataset, tmp_path / "run"))
    assert len(calls) == 3 and "\n" not in str(err.value) and "--lr" in str(err.value)


def test_cli_reports_a_skipped_step_and_an_epoch_without_a_finite_loss(tiny_dataset, tmp_path, monkeypatch):
    calls = _poison(monkeypatch, {0, 1, 2, 3})  # the whole first epoch (4 steps)
    out = tmp_path / "run"
    r = _cli_train(tiny_dataset, out)
    assert r.exit_code == 0, r.output
    assert len(calls) == 8 and "epoch 1: loss –" in r.output and "skipped the update of step 1" in r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and rows[1]["train_loss"] > 0


def test_a_skipped_first_step_does_not_make_pytorch_warn_about_the_scheduler_order(tiny_dataset, tmp_path):
    """The schedule moves on over a skipped step, so that the LR of step n never depends on how many
    steps were skipped; on the very first step PyTorch took that for a scheduler called before its
    optimizer and printed a misleading warning."""
    import warnings

    from clipret.training.loop import train

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _poison(mp, {0})
        train(_cfg(tiny_dataset, tmp_path / "run"))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] == 1  # the first step was indeed skipped


def _record_steps(mp: pytest.MonkeyPatch, poison) -> list[dict]:
    """Wrap the training step: ``poison(call, state, batch)`` may spoil call ``call`` (0-based); each
    call's buffers before and after and its ``finite`` flag are logged."""
    from clipret.training import loop

    log: list[dict] = []
    original = loop.train_step

    def step(state, batch, epoch):
        handle = poison(len(log), state, batch)
        before = [b.clone() for b in state.model.buffers()]
        info = original(state, batch, epoch)
        if handle is not None:
            handle.remove()
        log.append({"before": before, "after": [b.clone() for b in state.model.buffers()], "finite": info["finite"]})
        return info

    mp.setattr(loop, "train_step", step)
    return log


def _inf_pixels(call: int, state, batch) -> None:
    if call == 1:
        batch["images"][0] = float("inf")  # one image: the forward of the whole batch is not finite


def _inf_running_var(call: int, state, batch):
    """On call 1, a hook spoils the head's BatchNorm statistics after its forward; its output, the
    loss and the gradient stay finite."""
    def spoil(module, inputs, output) -> None:
        module.running_var = torch.full_like(module.running_var, float("inf"))  # the backward needs the old tensor

    return state.model.head.bn.register_forward_hook(spoil) if call == 1 else None


@pytest.mark.parametrize("poison", [_inf_pixels, _inf_running_var], ids=["inf pixels", "inf statistics only"])
def test_a_nonfinite_forward_leaves_every_batchnorm_statistic_as_it_was(tiny_dataset, tmp_path, poison):
    """The train-mode forward updates the BatchNorm running statistics (the head's and every layer's
    of a ResNet tower) before the step is judged: a skipped step puts them back, else one inf
    leaves them NaN for good and every later embedding NaN."""
    from clipret.training.loop import train

    with pytest.MonkeyPatch.context() as mp:
        log = _record_steps(mp, poison)
        train(_cfg(tiny_dataset, tmp_path / "run"))
    assert [s["finite"] for s in log] == [True, False] + [True] * (len(log) - 2)
    assert any(not torch.equal(a, b) for a, b in zip(log[0]["before"], log[0]["after"]))  # a forward moves them
    assert all(torch.equal(a, b) for a, b in zip(log[1]["before"], log[1]["after"]))
    assert all(torch.isfinite(b).all() for s in log for b in s["after"])
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.endswith("running_mean") for k in weights) and all(torch.isfinite(w).all() for w in weights.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 0] and all("val_map@r" in r for r in rows)


def test_a_nonfinite_loss_with_a_finite_gradient_is_skipped(tiny_dataset, tmp_path):
    """A NaN added to the loss leaves its gradient finite: the step is skipped on the loss alone."""
    from clipret.training import losses
    from clipret.training.loop import train

    original = losses.Objective.__call__

    def call(self, emb, labels, epoch):
        loss, info = original(self, emb, labels, epoch)
        call.n += 1
        return (loss + float("nan"), info) if call.n == 2 else (loss, info)

    call.n = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(losses.Objective, "__call__", call)
        log = _record_steps(mp, lambda *a: None)
        train(_cfg(tiny_dataset, tmp_path / "run"))
    assert [s["finite"] for s in log][:3] == [True, False, True]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] == 1 and rows[0]["train_loss"] == rows[0]["train_loss"]  # NaN != NaN


def _nan_validation(mp: pytest.MonkeyPatch, bad_calls: set[int] | None) -> list[int]:
    """Make the held-out embeddings NaN on the given 0-based validations (every one when None)."""
    from clipret.training import heldout

    calls: list[int] = []
    original = heldout.embed_images

    def embed(*args, **kwargs):
        vecs, kept, rest = original(*args, **kwargs)
        if bad_calls is None or len(calls) in bad_calls:
            vecs = np.full_like(vecs, np.nan)
        calls.append(len(calls))
        return vecs, kept, rest

    mp.setattr(heldout, "embed_images", embed)
    return calls


def test_nonfinite_validation_embeddings_fail_the_epoch_and_are_never_exported(tiny_dataset, tmp_path, monkeypatch):
    """An argsort of NaNs keeps the index order, which scored all-NaN embeddings as chance (R@1 =
    MAP@R ≈ 1/C): better than the starting -1, so epoch 1 of a poisoned model was exported."""
    _nan_validation(monkeypatch, {0})
    out = tmp_path / "run"
    r = _cli_train(tiny_dataset, out)
    assert r.exit_code == 0, r.output
    assert "validation of epoch 1 failed: 8 held-out embeddings were not finite" in " ".join(r.output.split())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_nonfinite"] == 8 and "val_map@r" not in rows[0] and rows[0]["best"] is False
    assert rows[1]["best"] is True and "val_nonfinite" not in rows[1]
    exported, last = load_file(str(out / "model.safetensors")), torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(w, last[k]) for k, w in exported.items())  # epoch 2's weights


def test_a_run_whose_every_validation_fails_exports_nothing(tiny_dataset, tmp_path, monkeypatch):
    from clipret.training.loop import train

    _nan_validation(monkeypatch, None)
    with pytest.raises(ClipretError, match="no epoch gave finite .* no model was exported") as err:
        train(_cfg(tiny_dataset, tmp_path / "run"))
    assert "\n" not in str(err.value) and "--lr" in str(err.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()
