"""What a checkpoint carries between processes: each rank's own CUDA RNG state, and a GradScaler
state that may be empty (issue 18, items 4 and 5). No GPU is needed: torch.cuda is faked."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_RN
from clipret.config import TrainConfig
from clipret.training import state as ckpt_state


def _fake_cuda(mp: pytest.MonkeyPatch, count: int, current: int = 0) -> dict[int, torch.Tensor]:
    """``count`` visible GPUs; device i's RNG state is 16 bytes of value i. Returns what each
    device was set to. Like torch, touching a device that is not visible raises IndexError."""
    set_to: dict[int, torch.Tensor] = {}

    def index(device) -> int:
        i = current if device == "cuda" else (device.index if isinstance(device, torch.device) else int(device))
        if i >= count:
            raise IndexError(f"device {i} of {count}")
        return i

    def set_rng_state(new_state, device="cuda") -> None:
        set_to[index(device)] = new_state

    def set_rng_state_all(states) -> None:  # torch's own: every entry to the device of its position
        for i, s in enumerate(states):
            set_rng_state(s, i)

    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: count)
    mp.setattr(torch.cuda, "current_device", lambda: current)
    mp.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), index(device), dtype=torch.uint8))
    mp.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), i, dtype=torch.uint8) for i in range(count)])
    mp.setattr(torch.cuda, "set_rng_state", set_rng_state)
    mp.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    return set_to


def test_a_checkpoint_holds_only_this_ranks_cuda_rng_state(monkeypatch):
    _fake_cuda(monkeypatch, count=8, current=3)
    saved = ckpt_state.capture_rng(torch.device("cuda", 5))
    assert torch.equal(saved["cuda"], torch.full((16,), 5, dtype=torch.uint8))  # not a list of all 8
    assert torch.equal(ckpt_state.capture_rng()["cuda"], torch.full((16,), 3, dtype=torch.uint8))  # the current one
    assert "cuda" not in ckpt_state.capture_rng(torch.device("cpu"))  # a CPU run draws nothing from CUDA


def test_resume_on_fewer_gpus_restores_this_devices_state(monkeypatch):
    """An 8-GPU run resumed on 4, or under CUDA_VISIBLE_DEVICES=0: torch.cuda.set_rng_state_all
    of the 8 saved states raised IndexError."""
    with pytest.MonkeyPatch.context() as mp:
        _fake_cuda(mp, count=8)
        old = {**ckpt_state.capture_rng(), "cuda": torch.cuda.get_rng_state_all()}  # before the fix: every GPU's
        new = ckpt_state.capture_rng(torch.device("cuda", 6))
    set_to = _fake_cuda(monkeypatch, count=1)
    ckpt_state.restore_rng(old)
    assert list(set_to) == [0] and torch.equal(set_to[0], old["cuda"][0])
    ckpt_state.restore_rng(new, torch.device("cuda", 0))  # rank 6's state, now on the one visible GPU
    assert torch.equal(set_to[0], torch.full((16,), 6, dtype=torch.uint8))
    set_to = _fake_cuda(monkeypatch, count=4, current=2)
    ckpt_state.restore_rng({**old, "cuda": old["cuda"][:2]})  # a 2-GPU run's list has no entry for device 2
    assert set_to == {}


def test_an_empty_scaler_state_starts_the_scaler_fresh():
    fresh = torch.amp.GradScaler("cpu")  # an enabled scaler (fp16 needs CUDA; the CPU one behaves alike)
    ckpt_state.restore_scaler(fresh, {})  # a bf16 or fp32 run saved {}: load_state_dict raised RuntimeError
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()
    ckpt_state.restore_scaler(fresh, {**fresh.state_dict(), "scale": 8.0})
    assert fresh.get_scale() == 8.0


def test_resume_with_fp16_switched_on_loads_a_run_saved_without_a_scaler(tiny_dataset, tmp_path, monkeypatch):
    from clipret.training import setup
    from clipret.training.loop import train

    cfg = TrainConfig(root=str(tiny_dataset), out=str(tmp_path / "run"), model=str(TINY_RN), pretrained="none",
                      image_size=32, epochs=1, p=3, k=2, device="cpu", val_split=0.0, seed=1, workers=0)
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"] == {}
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **kw: scaler("cpu"))  # what --amp fp16 builds, on CPU
    state = setup.prepare(cfg, ckpt, lambda kind, payload: None)
    assert state.scaler.is_enabled() and state.scaler.get_scale() == scaler("cpu").get_scale()
    assert state.best == ckpt["best"] and state.step == ckpt["step"]  # the rest of the checkpoint loaded too
