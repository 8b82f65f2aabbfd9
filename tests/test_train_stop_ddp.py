"""SIGTERM on one torchrun rank: every rank stops after the same step, with one checkpoint.

2 CPU ranks on gloo, as tests/test_ddp.py runs them. The signal reaches rank 1 alone (as a
scheduler that signals one process would), during step 3 of 6 (the first of epoch 2).
"""

from __future__ import annotations

import shlex

import pytest
import torch

from test_ddp import ARGS, _assert_same_weights, metrics, torchrun

pytestmark = pytest.mark.slow

NO_SAVE_ARGS = [a if prev != "--save-every" else "0" for prev, a in zip([""] + ARGS, ARGS)]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(tiny_dataset, tmp_path):
    reference = tmp_path / "reference"
    r = torchrun("train", tiny_dataset, "--out", reference, *NO_SAVE_ARGS)
    assert r.returncode == 0, r.stderr

    run = tmp_path / "run"
    # rank 0 (never signalled) leaves slowly: the launcher's closing SIGTERM, sent once rank 1 has exited,
    # reaches it on its way out and must not kill it
    r = torchrun("train", tiny_dataset, "--out", run, *NO_SAVE_ARGS, CLIPRET_FAULT_SIGNAL="TERM:3:1",
                 CLIPRET_FAULT_SLOW_EXIT="0:3")
    assert r.returncode != 0  # torchrun reports its ranks' exit code 143 as a failure
    assert r.stderr.count("exitcode  : 143") == 2, r.stderr  # both ranks stopped themselves, neither was killed
    command = "torchrun --nproc_per_node 2 -m " + shlex.join(["clipret", "train", "--resume", str(run)])
    assert r.stderr.count(f"stopped by SIGTERM after step 3 of 6; checkpoint written to {run}; continue with: {command}") == 1
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (3, 1, 1)

    r = torchrun("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3 of 6" in r.stderr
    _assert_same_weights(reference, run)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]  # noqa: E731
    assert strip(metrics(reference)) == strip(metrics(run))
