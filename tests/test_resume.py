"""Crash tests: SIGKILL, SIGINT or SIGTERM training and embedding subprocesses, then resume.

The signals are real, delivered by the process to itself at a chosen file write or training
step (see clipret/_fault.py), so each test hits the same point every time.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY_RN

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["--model", str(TINY_RN), "--pretrained", "none", "--image-size", "32", "--epochs", "3", "--p", "3",
              "--k", "2", "--workers", "0", "--device", "cpu", "--val-split", "0.25", "--save-every", "2", "--seed", "7",
              "--mine-from-epoch", "2"]


def clipret(*args: str, kill_at: str | None = None, signal_at: str | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("CLIPRET_FAULT_KILL", "CLIPRET_FAULT_SIGNAL", "CLIPRET_DEBUG"):
        env.pop(name, None)
    if kill_at:
        env["CLIPRET_FAULT_KILL"] = kill_at
    if signal_at:
        env["CLIPRET_FAULT_SIGNAL"] = signal_at
    return subprocess.run([sys.executable, "-m", "clipret", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "model.safetensors"))


def final_state(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = clipret("train", tiny_dataset, "--out", out, *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    sa, sb = final_state(a), final_state(b)
    assert sa["step"] == sb["step"]
    for k in sa["model"]:
        assert sa["model"][k].equal(sb["model"][k]), k
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


@pytest.mark.parametrize(
    "kill_at",
    [
        "after-rename:checkpoint.pt:3",  # mid-epoch, right after a --save-every checkpoint
        "before-rename:checkpoint.pt:2",  # during a checkpoint write: the temp file is complete, not yet renamed
        "before-rename:model.safetensors:1",  # while exporting the best model, before that epoch's checkpoint
    ],
)
def test_train_sigkill_then_resume_equals_uninterrupted(reference_run, tiny_dataset, tmp_path, kill_at):
    out = tmp_path / "run"
    r = clipret("train", tiny_dataset, "--out", out, *TRAIN_ARGS, kill_at=kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / "checkpoint.pt").is_file()
    if kill_at.startswith("before-rename"):
        assert list(out.glob(".*.tmp")), "the killed write should have left its temp file"
    r = clipret("train", tiny_dataset, "--out", out, "--resume", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert not list(out.glob(".*.tmp"))
    _assert_same_run(reference_run, out)


NO_SAVE_ARGS = [a if prev != "--save-every" else "0" for prev, a in zip([""] + TRAIN_ARGS, TRAIN_ARGS)]


@pytest.mark.parametrize("sig, step, code", [("INT", 7, 130), ("TERM", 8, 143)])
def test_train_stopped_by_a_signal_checkpoints_and_resumes_exactly(reference_run, tiny_dataset, tmp_path, sig, step, code):
    """With --save-every 0, a signal during step 7 (mid-epoch 2) or step 8 (epoch 2's last): the step
    finishes, a checkpoint is written after it, the resume command is printed, and resuming with it
    ends as the uninterrupted run does."""
    out = tmp_path / "run"
    r = clipret("train", tiny_dataset, "--out", out, *NO_SAVE_ARGS, signal_at=f"{sig}:{step}")
    assert r.returncode == code, r.stderr
    saved = final_state(out)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (step, 1, step - 4)  # 4 steps per epoch
    command = shlex.join(["clipret", "train", "--resume", str(out)])
    assert f"stopped by SIG{sig} after step {step} of 12; checkpoint written to {out}; continue with: {command}" in r.stderr
    assert "Traceback" not in r.stderr
    r = clipret(*shlex.split(command)[1:])
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {step} of 12" in r.stderr
    _assert_same_run(reference_run, out)


W2_ARGS = [a if prev != "--workers" else "2" for prev, a in zip([""] + TRAIN_ARGS, TRAIN_ARGS)]


@pytest.fixture(scope="module")
def two_worker_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2") / "run"
    r = clipret("train", tiny_dataset, "--out", out, *W2_ARGS)
    assert r.returncode == 0, r.stderr
    assert "workers: 2" in r.stderr
    return out


def test_two_workers_train_exactly_as_none(reference_run, two_worker_run):
    """Augmentation is seeded per sample, so the worker count does not change the weights."""
    _assert_same_run(reference_run, two_worker_run)


def test_resume_from_the_run_folder_alone_keeps_its_settings(reference_run, two_worker_run, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # started with a relative ROOT from the dataset's parent folder...
    r = clipret("train", tiny_dataset.name, "--out", out, *W2_ARGS, kill_at="after-rename:checkpoint.pt:3", cwd=tiny_dataset.parent)
    assert r.returncode == -signal.SIGKILL, r.stderr
    # ...resumed from elsewhere with nothing but the run folder: data root, --workers 2 and the rest come from the run
    (tmp_path / "elsewhere").mkdir()
    r = clipret("train", "--resume", out, cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 6 of 12" in r.stderr and "workers: 2" in r.stderr and "overridden" not in r.stderr
    _assert_same_run(two_worker_run, out)
    _assert_same_run(reference_run, out)


def test_resume_names_overridden_settings_and_refuses_others(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    r = clipret("train", "--resume", run, "--workers", "1", "--device", "cpu")  # --device cpu is the run's own
    assert r.returncode == 0, r.stderr
    assert "overridden: workers 1 (was 0)" in r.stderr and "device" not in r.stderr.split("overridden")[1].splitlines()[0]
    r = clipret("train", "--resume", run, "--lr", "0.1", "--k", "2")  # --k 2 is the run's own
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot change when resuming" in r.stderr and "--lr 0.0004" in r.stderr and "--k" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_refuses_to_clobber_a_run_without_resume(reference_run, tiny_dataset):
    r = clipret("train", tiny_dataset, "--out", reference_run, *TRAIN_ARGS)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_resume_without_checkpoint_is_a_user_error(tiny_dataset, tmp_path):
    r = clipret("train", tiny_dataset, "--out", tmp_path / "none", "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr


EMBED_ARGS = ["--model", str(TINY_RN), "--pretrained", "none", "--workers", "0", "--device", "cpu",
              "--shard-size", "4", "--batch-size", "3"]


def test_embed_sigkill_then_resume_reembeds_only_missing_shards(tiny_dataset, tmp_path):
    gallery = tiny_dataset / "test" / "gallery"  # 16 images -> 4 shards of 4
    ref = tmp_path / "ref.npy"
    assert clipret("embed", gallery, "--out", ref, *EMBED_ARGS).returncode == 0
    again = tmp_path / "again.npy"
    assert clipret("embed", gallery, "--out", again, *EMBED_ARGS).returncode == 0
    assert ref.read_bytes() == again.read_bytes()  # deterministic on CPU

    out = tmp_path / "g.npy"
    parts = tmp_path / "g.npy.parts"
    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, kill_at="after-rename:shard-000001.json:1")
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and sorted(p.name for p in parts.glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*")}

    # resume, and die again right after the first newly embedded shard
    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--resume", kill_at="after-rename:shard-000002.json:1")
    assert r.returncode == -signal.SIGKILL
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*")}
    assert all(after[name] == t for name, t in before.items()), "finished shards must not be re-embedded"
    assert "shard-000002.npy" in after

    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--resume")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert json.loads(out.with_suffix(".json").read_text())["ids"] == json.loads(ref.with_suffix(".json").read_text())["ids"]
    assert not parts.exists()


def test_embed_resume_refuses_parts_of_another_model(tiny_dataset, tmp_path):
    gallery = tiny_dataset / "test" / "gallery"
    out = tmp_path / "g.npy"
    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, kill_at="after-rename:shard-000000.json:1")
    assert r.returncode == -signal.SIGKILL
    other = [a if a != str(TINY_RN) else str(TINY_RN.with_name("tiny-vit.json")) for a in EMBED_ARGS]
    r = clipret("embed", gallery, "--out", out, *other, "--resume")
    assert r.returncode == 2 and "another model" in r.stderr


@pytest.fixture(scope="module")
def embed_reference(tiny_dataset, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("embed-ref") / "ref.npy"
    r = clipret("embed", tiny_dataset / "test" / "gallery", "--out", ref, *EMBED_ARGS)
    assert r.returncode == 0, r.stderr
    return ref


@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143)])
def test_embed_stopped_by_a_signal_keeps_its_shards_and_prints_the_resume_command(tiny_dataset, tmp_path, embed_reference,
                                                                                   sig, code):
    gallery = tiny_dataset / "test" / "gallery"
    out = tmp_path / "g.npy"
    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--tta", "flip", kill_at=f"after-rename:shard-000001.json:1:{sig}")
    assert r.returncode == code, r.stderr
    assert sorted(p.name for p in (tmp_path / "g.npy.parts").glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]
    said = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and f"stopped by SIG{sig}; 2 finished shard(s) kept in {tmp_path / 'g.npy.parts'}" in said[0], r.stderr
    command = shlex.split(said[0].split("continue with: ")[1])
    given = ["--out", str(out), *EMBED_ARGS, "--tta", "flip"]
    assert command[:3] == ["clipret", "embed", str(gallery)] and command[-1] == "--resume"
    assert dict(zip(command[3:-1:2], command[4:-1:2])) == dict(zip(given[::2], given[1::2]))  # the same options
    r = clipret(*command[1:])
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "g.npy.parts").exists()
    flip = tmp_path / "flip.npy"  # the same run, uninterrupted
    assert clipret("embed", gallery, "--out", flip, *EMBED_ARGS, "--tta", "flip").returncode == 0
    assert out.read_bytes() == flip.read_bytes()


def test_embed_rerun_keeps_finished_shards_and_refuses_changed_settings(tiny_dataset, tmp_path, embed_reference):
    gallery = tiny_dataset / "test" / "gallery"
    out, parts = tmp_path / "g.npy", tmp_path / "g.npy.parts"
    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, kill_at="after-rename:shard-000001.json:1")
    assert r.returncode == -signal.SIGKILL
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*")}

    def refused(r: subprocess.CompletedProcess, *words: str) -> None:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr

    refused(clipret("embed", gallery, "--out", out, *EMBED_ARGS), "2 finished shard(s)", "--resume", "--overwrite")
    refused(clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--resume", "--exact-decode"),
            "made with no --exact-decode (now --exact-decode)", "--overwrite")
    refused(clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--resume", "--overwrite"), "pass one of them")
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*")} == before  # nothing thrown away or rewritten

    r = clipret("embed", gallery, "--out", out, *EMBED_ARGS, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == embed_reference.read_bytes() and not parts.exists()
