"""The torchrun training example of ``clipret train --help`` (and README.md) runs as written:
P and K by their long names, which torchrun's own parser leaves alone (it takes ``--p`` as an
abbreviation of its ``--print-completion``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RN

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    from clipret.cli.train import train_command

    lines = [line.strip() for line in (train_command.__doc__ or "").splitlines() if line.strip().startswith("torchrun ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_example_names_p_and_k_by_their_long_names_and_torchrun_passes_them_on():
    from torch.distributed.run import get_args_parser

    example = _example().split()
    assert "--classes-per-batch" in example and "--images-per-class" in example and "--p" not in example
    args = get_args_parser().parse_args(example[1:])
    assert args.module and args.training_script == "clipret"
    assert args.training_script_args == example[example.index("clipret") + 1:]
    with pytest.raises(SystemExit):  # why the example cannot say --p
        get_args_parser().parse_args([*example[1:example.index("--classes-per-batch")], "--p", "32"])


def test_readme_shows_the_tested_torchrun_example():
    assert _example() in README.read_text(encoding="utf-8"), f"README.md should show: {_example()}"


@pytest.mark.slow
def test_the_torchrun_example_trains_on_two_cpu_ranks(tiny_dataset, tmp_path):
    run = tmp_path / "l14"
    example = _example().replace("./data", str(tiny_dataset)).replace("ViT-L-14", str(TINY_RN)).replace("runs/l14", str(run))
    args = example.split()
    assert args[:3] == ["torchrun", "--nproc_per_node", "8"]
    run.mkdir()
    for name in ("checkpoint.pt", "model.safetensors", "config.json", "excluded.json"):  # an old run, which
        (run / name).write_text("old")  # --overwrite takes away on rank 0 alone, before any rank writes
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args[3:],
               "--pretrained", "none", "--image-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
               "--overwrite"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPRET_FAULT")
           and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    r = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    # --classes-per-batch 32 reached clipret (4 classes: P capped at 4), --images-per-class 4 too, on 2 ranks
    assert "P=32 is more than the 4 training classes" in r.stderr
    assert "P×K = 4×4 per process × 2 processes" in r.stderr
    assert (run / "model.safetensors").read_bytes() != b"old" and (run / "checkpoint.pt").read_bytes() != b"old"
    assert not (run / "excluded.json").exists() and [p.name for p in tmp_path.iterdir()] == ["l14"]
