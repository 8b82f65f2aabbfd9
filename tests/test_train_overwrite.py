"""``clipret train --overwrite``: the old run is taken away (folder renamed, then deleted) as the new
run starts, so a new run killed early leaves nothing of the old one to ``--resume``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipret.cli import app
from clipret.config import TrainConfig
from clipret.errors import ClipretError
from clipret.training.setup import replace_run
from conftest import TINY_RN

RUN_FILES = ("checkpoint.pt", "model.safetensors", "config.json", "metrics.jsonl", "excluded.json")
ARGS = ["--model", str(TINY_RN), "--pretrained", "none", "--image-size", "32", "--epochs", "1", "--p", "2", "--k", "2",
        "--workers", "0", "--device", "cpu", "--val-split", "0"]


def _old_run(out: Path, *extra: str) -> Path:
    """A folder holding (fake) files of an old run, plus ``extra`` other files."""
    out.mkdir(parents=True)
    for name in (*RUN_FILES, *extra):
        (out / name).write_text("old")
    return out


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(root="data", out=str(out), model=str(TINY_RN), pretrained="none", **kw)


def test_the_old_run_folder_is_replaced_by_an_empty_one_with_its_mode(tmp_path):
    out = _old_run(tmp_path / "run")
    (tmp_path / ".run.removed-999999").mkdir()  # left by an --overwrite killed between rename and delete
    os.chmod(out, 0o750)
    replace_run(_cfg(out))
    assert out.is_dir() and list(out.iterdir()) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the renamed folder is gone too


def test_a_symlinked_out_keeps_its_link_and_the_folder_it_points_to_is_replaced(tmp_path):
    target = _old_run(tmp_path / "disk" / "run")
    (tmp_path / "link").symlink_to(target)
    replace_run(_cfg(tmp_path / "link"))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == target
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("extra", [["notes.txt"], ["a.npy", "b.npy", "c.npy", "d.npy"]])
def test_a_run_folder_holding_other_files_is_refused_and_left_alone(tmp_path, extra):
    out = _old_run(tmp_path / "run", *extra)
    with pytest.raises(ClipretError, match="also holds files clipret train did not write") as info:
        replace_run(_cfg(out))
    assert "\n" not in str(info.value) and extra[0] in str(info.value) and "another --out" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, *extra])


def test_a_folder_without_a_run_is_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    replace_run(_cfg(out))
    replace_run(_cfg(tmp_path / "missing"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "missing").exists()


def test_the_working_directory_is_not_replaced(tmp_path, monkeypatch):
    out = _old_run(tmp_path / "run")
    monkeypatch.chdir(out)
    with pytest.raises(ClipretError, match="working directory is inside it"):
        replace_run(_cfg(Path(".")))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


def test_bad_settings_are_refused_before_anything_is_deleted(tmp_path):
    out = _old_run(tmp_path / "run")
    r = CliRunner().invoke(app, ["train", "data", "--out", str(out), "--overwrite", *ARGS, "--pool", "cls"])
    assert r.exit_code == 2 and "--pool cls needs a ViT" in r.output
    with pytest.raises(ClipretError, match="--epochs"):
        replace_run(_cfg(out, epochs=0))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


@pytest.mark.slow
def test_overwrite_killed_right_after_start_leaves_no_old_run_to_resume(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "training", data / "training")
    first_class = sorted((data / "training").iterdir())[0]
    (first_class / "broken.jpg").write_bytes(b"not an image")  # so runs write excluded.json
    out = tmp_path / "run"
    old = CliRunner().invoke(app, ["train", str(data), "--out", str(out), *ARGS])
    assert old.exit_code == 0, old.output
    assert all((out / name).is_file() for name in RUN_FILES)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPRET_FAULT")}
    new = subprocess.run([sys.executable, "-m", "clipret", "train", str(data), "--out", str(out), "--overwrite", *ARGS],
                         env={**env, "CLIPRET_FAULT_KILL": "before-rename:excluded.json:1"}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert new.returncode == -signal.SIGKILL, new.stderr  # killed as it wrote its first file into the run folder
    assert [name for name in RUN_FILES if (out / name).exists()] == []
    assert [p.name for p in tmp_path.iterdir() if ".removed-" in p.name] == []
    resumed = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output
