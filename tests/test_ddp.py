"""Distributed training under torchrun: 2 CPU ranks on gloo, as CI runs them.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2`` (its own
free port, so tests may run side by side) on the tiny dataset, one thread per rank. The
per-step trace (clipret/training/trace.py) records a digest of every rank's weights after every
step; clipret/_fault.py kills a rank (SIGKILL at a file write) or makes one rank alone raise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from clipret.config import TrainConfig
from conftest import TINY_RN
from reference import ref_warmup_cosine

pytestmark = pytest.mark.slow

# 24 training images, P×K = 3×2 per rank: 4 batches of the epoch plan, 2 per rank, 6 steps in 3 epochs
ARGS = ["--model", str(TINY_RN), "--pretrained", "none", "--image-size", "32", "--epochs", "3", "--classes-per-batch", "3",
        "--k", "2", "--workers", "0", "--device", "cpu", "--val-split", "0.25", "--save-every", "1", "--seed", "7",
        "--mine-from-epoch", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLIPRET_FAULT", "CLIPRET_TRAIN_TRACE")) and k not in {"CLIPRET_DEBUG", "RANK", "WORLD_SIZE",
                                                                                       "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(*args: object, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "-m", "clipret", *map(str, args)], capture_output=True, text=True, env=_env(**env),
                          timeout=timeout, check=False)


def clipret(*args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipret", *map(str, args)], capture_output=True, text=True, env=_env(**env),
                          timeout=300, check=False)


def trace(folder: Path) -> dict[int, list[dict]]:
    return {r: [json.loads(x) for x in (folder / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted 2-rank run, traced."""
    base = tmp_path_factory.mktemp("ddp")
    r = torchrun("train", tiny_dataset, "--out", base / "run", *ARGS, CLIPRET_TRAIN_TRACE=str(base / "trace"))
    assert r.returncode == 0, r.stderr
    return base / "run", trace(base / "trace"), r.stderr


def test_weights_are_identical_on_both_ranks_after_every_step(ddp_run):
    _, steps, _ = ddp_run
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == list(range(1, 7))
    assert all(s["world_size"] == 2 for s in steps[0] + steps[1])
    for a, b in zip(steps[0], steps[1]):
        assert a["params"] == b["params"], f"weights differ after step {a['step']}"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the loss of the whole 2-rank batch, on each rank
    assert len({s["params"] for s in steps[0]}) == 6  # ...and the steps did change them


def test_one_model_folder_written_and_one_rank_reports(ddp_run):
    import torch

    run, _, stderr = ddp_run
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.safetensors"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["run", "trace"]
    assert stderr.count("training tiny-rn") == 1 and stderr.count("best epoch") == 1
    assert "3×2 per process × 2 processes = 12 images per step; 6 steps" in stderr
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2 and ckpt["step"] == 6
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])  # dropout differs per rank


# ---------------------------------------------------------------------------
# the gathered loss
# ---------------------------------------------------------------------------

LOSS_SCRIPT = """
import sys
import numpy as np, torch, torch.distributed as dist
from clipret.training.losses import Objective

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = np.load(sys.argv[1])
rows = np.array_split(np.arange(len(data["labels"])), world)[rank]
out = {"rows": rows}
for epoch, name in [(0, "plain"), (9, "mined")]:
    objective = Objective(mine_from_epoch=5)
    emb = torch.from_numpy(data["emb"][rows]).requires_grad_(True)
    loss, info = objective(emb, torch.from_numpy(data["labels"][rows]), epoch)
    loss.backward()
    out.update({name + "_loss": loss.detach().numpy(), name + "_grad": emb.grad.numpy(), "world": objective.world_size,
                name + "_pairs": info.get("mined_pairs", -1)})
# ArcFace: each rank's own rows; the proxies' gradients averaged over the ranks (same seeded proxies)
torch.manual_seed(0)
arc = Objective(loss="arcface", num_classes=4, embed_dim=8)
emb = torch.from_numpy(data["emb"][rows]).requires_grad_(True)
loss, _ = arc(emb, torch.from_numpy(data["labels"][rows]), 9)
loss.backward()
arc.sync_grads()
out.update({"arc_loss": loss.detach().numpy(), "arc_grad": emb.grad.numpy(), "arc_scale": arc.scale,
            "arc_proxy_grad": arc.parameters()[0].grad.numpy()})
# a step goes ahead only when every rank has a full P×K batch (an image failed to load on rank 1 here)
from types import SimpleNamespace
from clipret.training.loop import _usable
state = SimpleNamespace(world_size=world, p=2, cfg=SimpleNamespace(k=2), step=5, device=torch.device("cpu"))
full = {"images": torch.zeros(4, 3, 2, 2), "indices": torch.arange(4)}
short = {"images": torch.zeros(3, 3, 2, 2), "indices": torch.arange(3)}
warned = []
out["both_full"] = _usable(state, full, lambda kind, payload: warned.append(payload))
out["one_short"] = _usable(state, short if rank == 1 else full, lambda kind, payload: warned.append(payload))
out["one_empty"] = _usable(state, {"images": None, "indices": torch.arange(0)} if rank == 1 else full,
                           lambda kind, payload: warned.append(payload))
out["warnings"] = len(warned)
np.savez(f"{sys.argv[2]}/rank{rank}.npz", **out)
dist.destroy_process_group()
"""


def test_gathered_loss_equals_the_one_rank_loss_of_the_concatenated_batch(tmp_path):
    """Each rank's loss is W × the 1-rank loss of the concatenated batch, and its gradient W × the
    1-rank gradient of its own rows: DDP's average over ranks then gives the 1-rank gradient.
    (The same launch checks that the ranks skip a step together when one has a short batch.)"""
    import torch

    from clipret.training.losses import Objective

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=16)  # classes shared across the two halves: cross-rank positives
    np.savez(tmp_path / "in.npz", emb=emb, labels=labels)
    (tmp_path / "loss.py").write_text(LOSS_SCRIPT)
    r = subprocess.run([*TORCHRUN, str(tmp_path / "loss.py"), str(tmp_path / "in.npz"), str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    ranks = [np.load(tmp_path / f"rank{i}.npz") for i in (0, 1)]
    assert sorted(np.concatenate([x["rows"] for x in ranks]).tolist()) == list(range(16))
    for epoch, name in [(0, "plain"), (9, "mined")]:
        single = Objective(mine_from_epoch=5)
        assert single.world_size == 1
        full = torch.from_numpy(emb).requires_grad_(True)
        loss, info = single(full, torch.from_numpy(labels), epoch)
        loss.backward()
        grad = full.grad.numpy()
        if name == "mined":
            assert info["mined_pairs"] > 0
        for x in ranks:
            assert int(x["world"]) == 2
            assert float(x[name + "_loss"]) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)
            np.testing.assert_allclose(x[name + "_grad"], 2 * grad[x["rows"]], rtol=1e-4, atol=1e-6)
            if name == "mined":
                assert int(x[name + "_pairs"]) == info["mined_pairs"]  # the miner saw the whole batch
    # ArcFace (a mean over rows): each rank's own rows' loss; DDP's average of the model gradients and
    # sync_grads' average of the proxies' gradients give the 1-rank gradients of the whole batch
    torch.manual_seed(0)
    arc = Objective(loss="arcface", num_classes=4, embed_dim=8)
    full = torch.from_numpy(emb).requires_grad_(True)
    loss, _ = arc(full, torch.from_numpy(labels), 9)
    loss.backward()
    proxy_grad = arc.parameters()[0].grad.numpy()
    for x in ranks:
        assert int(x["arc_scale"]) == 1
        np.testing.assert_allclose(x["arc_grad"], 2 * full.grad.numpy()[x["rows"]], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(x["arc_proxy_grad"], proxy_grad, rtol=1e-4, atol=1e-6)
    assert float(ranks[0]["arc_loss"] + ranks[1]["arc_loss"]) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)
    for x in ranks:  # every rank skips a step together when one rank's batch is short or empty
        assert bool(x["both_full"]) and not bool(x["one_short"]) and not bool(x["one_empty"]) and int(x["warnings"]) == 2


# ---------------------------------------------------------------------------
# skipping a non-finite step together
# ---------------------------------------------------------------------------

SPOIL_SCRIPT = """
import sys
import torch
from clipret import runtime
from clipret.cli import main
from clipret.training import loop

original = loop.train_step

def step(state, batch, epoch):  # rank 1 alone: its head's BatchNorm statistics go inf in step 2's forward
    spoil = lambda module, inputs, output: setattr(module, "running_var", torch.full_like(module.running_var, float("inf")))
    handle = state.model.head.bn.register_forward_hook(spoil) if runtime.rank() == 1 and state.step == 1 else None
    try:
        return original(state, batch, epoch)
    finally:
        if handle is not None:
            handle.remove()

loop.train_step = step
sys.argv[0] = "clipret"
main()
"""


def test_every_rank_skips_a_step_whose_statistics_are_not_finite_on_one_rank(tiny_dataset, tmp_path):
    """The loss and the averaged gradient stay finite, so only rank 1 sees the problem: unless the
    ranks agree, rank 0 takes the step and rank 1 does not, and their weights part for good."""
    (tmp_path / "spoil.py").write_text(SPOIL_SCRIPT)
    args = [a if prev != "--epochs" else "2" for prev, a in zip([""] + ARGS, ARGS)]
    r = subprocess.run([*TORCHRUN, str(tmp_path / "spoil.py"), "train", str(tiny_dataset), "--out", str(tmp_path / "run"),
                        *args], capture_output=True, text=True, env=_env(CLIPRET_TRAIN_TRACE=str(tmp_path / "trace")),
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    steps = trace(tmp_path / "trace")
    assert [s["params"] for s in steps[0]] == [s["params"] for s in steps[1]]
    assert steps[0][1]["params"] == steps[0][0]["params"] != steps[0][2]["params"]  # step 2 changed nothing
    assert [row["skipped_steps"] for row in metrics(tmp_path / "run")] == [1, 0]
    assert "skipped the update of step 2" in " ".join(r.stderr.split())


# ---------------------------------------------------------------------------
# failing together
# ---------------------------------------------------------------------------

FAIL_ARGS = [a if prev != "--epochs" else "1" for prev, a in zip([""] + ARGS, ARGS)]


def test_a_failing_rank_brings_every_rank_down_under_torchrun(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    r = torchrun("train", tiny_dataset, "--out", out, *FAIL_ARGS, timeout=120, CLIPRET_FAULT_RAISE="1:1")
    assert r.returncode != 0
    assert "error: rank 1: injected failure at step 1" in r.stderr
    assert "clipret/training/" not in r.stderr  # one line from the failing rank, no traceback through clipret
    assert not (out / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_rank_brings_every_rank_down_without_torchrun_too(tiny_dataset, tmp_path):
    """Our own behaviour, with no torchrun agent to stop the others: rank 1 raises a user
    error and exits 2; rank 0, waiting for it in a collective, leaves with an error of its own."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, CLIPRET_FAULT_RAISE="1:1")
        procs.append(subprocess.Popen([sys.executable, "-m", "clipret", "train", tiny_dataset, "--out", tmp_path / "run",
                                       *FAIL_ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]  # a hang fails here
    assert procs[1].returncode == 2 and "rank 1: injected failure at step 1" in outputs[1][1]
    assert procs[0].returncode == 1 and "lost contact with another rank" in outputs[0][1], outputs[0][1]
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------
# resume under torchrun
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_run(tiny_dataset, tmp_path_factory):
    """A 2-rank run whose rank 0 was SIGKILLed right after its mid-epoch-2 checkpoint (step 3 of 6)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    r = torchrun("train", tiny_dataset, "--out", out, *ARGS, CLIPRET_FAULT_KILL="after-rename:checkpoint.pt:3")
    assert r.returncode != 0
    assert "exitcode  : -9" in r.stderr  # rank 0 died of the SIGKILL; torchrun stopped rank 1
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_resume_of_a_killed_two_rank_run_equals_the_uninterrupted_run(ddp_run, killed_run, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    r = torchrun("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3 of 6" in r.stderr and "process(es)" not in r.stderr
    reference, _, _ = ddp_run
    _assert_same_weights(reference, run)
    a, b = (torch.load(x / "checkpoint.pt", weights_only=True) for x in (reference, run))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]
    assert strip(metrics(reference)) == strip(metrics(run))


def test_resume_with_one_process_continues_the_schedule_of_a_two_rank_run(killed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    r = clipret("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    # 2 of the epoch plan's 4 batches of epoch 2 were done: one process starts at its batch 2, step 4 + 2 of 3 × 4
    assert "resuming at step 6 of 12" in r.stderr and "it ran on 2 process(es), now 1" in r.stderr
    rows = metrics(run)
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 2), (2, 8), (3, 12)]
    lr = TrainConfig().lr
    assert rows[0]["lr"] == pytest.approx(lr * ref_warmup_cosine(1, 6, round(0.15 * 6)))  # the 2-rank schedule
    for row in rows[1:]:  # the 1-process schedule, from where the 2-rank run had got to
        assert row["lr"] == pytest.approx(lr * ref_warmup_cosine(row["step"] - 1, 12, round(0.15 * 12)))
    assert (run / "model.safetensors").is_file()


# ---------------------------------------------------------------------------
# bench/ddp.py cannot rot
# ---------------------------------------------------------------------------


def test_ddp_bench_runs_and_checks_the_weights(tmp_path):
    from conftest import ROOT

    out = tmp_path / "ddp.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ddp.py"), "--model", "tiny-rn", "--p", "2", "--k", "2",
                        "--image-size", "32", "--n-classes", "4", "--per-class", "4", "--epochs", "1", "--skip", "0",
                        "--no-two-threads", "--bn", "--work", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    rows = {row["ranks"]: row for row in res["rows"]}
    assert rows[1]["steps"] == 4 and rows[2]["steps"] == 2  # 16 images, P×K = 4: 4 batches, 2 per rank
    assert rows[1]["same_weights"] and rows[2]["same_weights"]
    assert rows[2]["step_scaling"] == pytest.approx(rows[2]["step_img_s"] / rows[1]["step_img_s"])
    bn = res["bn"]["tiny-rn"]
    assert bn["grad_rel_diff"] > 0 and -1 <= bn["grad_cosine"] <= 1
    assert "2 ranks, 1 thread" in r.stdout
