"""DDP scaling on the CPU: ``clipret train`` on 1 rank against 2 ranks (torchrun, gloo), side by side.

Every configuration runs the real command, ``python -m clipret train`` or ``python -m
torch.distributed.run --standalone --nproc_per_node N -m clipret train``, on the same synthetic
dataset, with the same P×K per rank (so 2 ranks take twice the images per step, in half the
steps of an epoch), ``--workers 0``, no validation, and the per-step trace of
clipret/training/trace.py on. From the trace it reports, per configuration:

* step img/s: images of all ranks per step / the median step time (the slowest rank's),
  steps after the first ``--skip`` (warm-up) only; a step is forward, gathered loss and
  miner, backward with DDP's gradient all-reduce, optimiser;
* loop img/s: all images / the wall time from the first step's start to the last step's end
  (data loading included);
* whether the weights were bit-identical on every rank after every step (the digests of
  the trace).

The baseline is 1 rank with 1 thread; "1 rank, 2 threads" is what the same cores give to
one process. Scaling = img/s / the baseline's (2.0 would be perfect for 2 ranks).

``--bn`` adds a measurement for the SyncBatchNorm decision, in one process: for one
2 × P × K batch, the head's BatchNorm over all rows (what SyncBatchNorm computes across 2
ranks) against BatchNorm per P × K half (what each DDP rank computes), as the relative
difference of the loss and of the gradient, and the time of the BatchNorm itself against the
whole forward.

    flock /tmp/clipret-bench.lock python bench/ddp.py --bn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny-vit": ROOT / "clipret" / "configs" / "tiny-vit.json", "tiny-rn": ROOT / "clipret" / "configs" / "tiny-rn.json"}


def make_data(folder: Path, n_classes: int, per_class: int, size: int) -> Path:
    from clipret.data.synthetic import make_synthetic_dataset

    root = folder / f"data-{n_classes}x{per_class}-{size}"
    if not (root / "training").is_dir():
        make_synthetic_dataset(root, n_classes=n_classes, train_per_class=per_class, query_per_class=1,
                               gallery_per_class=1, image_size=size, seed=0)
    return root


def run_config(ranks: int, threads: int, model: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train once; return timings from the trace, and whether all ranks held the same weights."""
    name = f"{ranks}r{threads}t-{Path(model).stem}"
    out, trace = work / name / "run", work / name / "trace"
    train = ["train", str(data), "--out", str(out), "--overwrite", "--model", model, "--pretrained", "none",
             "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--classes-per-batch", str(args.p),
             "--k", str(args.k), "--workers", "0", "--device", "cpu", "--val-split", "0", "--seed", "0"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CLIPRET_TRAIN_TRACE": str(trace)}
    t = time.perf_counter()
    r = subprocess.run([*launcher, "-m", "clipret", *train], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = {rank: [json.loads(x) for x in (trace / f"rank-{rank}.jsonl").read_text().splitlines()] for rank in range(ranks)}
    steps = len(rows[0])
    same = all(len(rows[rank]) == steps for rank in rows) and all(
        len({rows[rank][i]["params"] for rank in rows}) == 1 for i in range(steps))
    step_s = statistics.median(max(rows[rank][i]["t_end"] - rows[rank][i]["t_start"] for rank in rows)
                               for i in range(args.skip, steps))
    loop_s = rows[0][-1]["t_end"] - rows[0][args.skip]["t_start"]
    images = args.p * args.k * ranks
    return {"name": name, "ranks": ranks, "threads": threads, "steps": steps, "same_weights": same,
            "step_s": step_s, "step_img_s": images / step_s, "loop_img_s": images * (steps - args.skip) / loop_s,
            "process_s": wall}


def bn_effect(model: str, args: argparse.Namespace) -> dict[str, float]:
    """Head BatchNorm over 2 P×K halves together (SyncBN) or apart (per-rank BN): loss, gradient, cost."""
    import torch
    import torch.nn.functional as F

    from clipret.model.build import build_encoder, make_spec
    from clipret.training.losses import Objective

    torch.manual_seed(0)
    net = build_encoder(make_spec(model, "none", image_size=args.image_size, dropout=0.0)).train()
    n = args.p * args.k
    images = torch.randn(2 * n, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(2 * args.p).repeat_interleave(args.k) % (args.p + args.p // 2)  # some classes on both halves
    objective = Objective(mine_from_epoch=1)
    bn = net.head.bn
    plain_forward = bn.forward

    def per_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for h in x.split(n)])

    def loss_and_grad(split: bool) -> tuple[float, torch.Tensor]:
        bn.forward = per_half if split else plain_forward  # type: ignore[method-assign]
        net.zero_grad(set_to_none=True)
        loss, _ = objective(net(images), labels, 10)
        loss.backward()
        bn.forward = plain_forward  # type: ignore[method-assign]
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    loss_all, grad_all = loss_and_grad(False)
    loss_half, grad_half = loss_and_grad(True)
    feats = net.head.fc(net.pooled(images).float()).detach()
    t_bn = _median_time(lambda: bn(feats), 20)
    with torch.no_grad():
        t_fwd = _median_time(lambda: net(images), 5)
    return {"loss_rel_diff": abs(loss_half - loss_all) / abs(loss_all),
            "grad_rel_diff": float((grad_half - grad_all).norm() / grad_all.norm()),
            "grad_cosine": float(F.cosine_similarity(grad_half, grad_all, dim=0)),
            "bn_share_of_forward": t_bn / t_fwd}


def _median_time(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help=f"preset ({', '.join(PRESETS)}) or open_clip config (repeatable)")
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--n-classes", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=24, help="training images per class")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timings")
    ap.add_argument("--no-two-threads", action="store_true", help="skip the 1 rank, 2 threads configuration")
    ap.add_argument("--bn", action="store_true", help="also measure per-rank against synchronised head BatchNorm")
    ap.add_argument("--work", help="folder for the dataset and runs (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    models = [str(PRESETS.get(m, m)) for m in (args.model or ["tiny-vit"])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = make_data(work, args.n_classes, args.per_class, args.image_size)
        results: dict[str, Any] = {"p": args.p, "k": args.k, "image_size": args.image_size, "cpus": os.cpu_count(), "rows": []}
        print(f"clipret train, P×K = {args.p}×{args.k} per rank, {args.n_classes * args.per_class} images "
              f"{args.image_size} px, {args.epochs} epochs, CPU (gloo); img/s counts every rank's images")
        print(f"  {'model':10s} {'config':18s} {'steps':>5s} {'step img/s':>10s} {'scaling':>7s} {'loop img/s':>10s} "
              f"{'scaling':>7s} {'process s':>9s}  weights equal on all ranks after every step")
        for model in models:
            configs = [(1, 1)] + ([] if args.no_two_threads else [(1, 2)]) + [(2, 1)]
            rows = [run_config(r, t, model, data, work, args) for r, t in configs]
            base = rows[0]
            for row in rows:
                row["model"] = Path(model).stem
                row["step_scaling"] = row["step_img_s"] / base["step_img_s"]
                row["loop_scaling"] = row["loop_img_s"] / base["loop_img_s"]
                config = f"{row['ranks']} rank{'s' if row['ranks'] > 1 else ''}, {row['threads']} thread{'s' if row['threads'] > 1 else ''}"
                print(f"  {row['model']:10s} {config:18s} {row['steps']:5d} {row['step_img_s']:10.1f} {row['step_scaling']:7.2f} "
                      f"{row['loop_img_s']:10.1f} {row['loop_scaling']:7.2f} {row['process_s']:9.1f}  "
                      f"{'yes' if row['same_weights'] else 'NO'}")
                results["rows"].append(row)
        if args.bn:
            print("head BatchNorm over one 2×P×K batch: per P×K half (each DDP rank) against all rows (SyncBatchNorm)")
            results["bn"] = {}
            for model in models:
                bn = bn_effect(model, args)
                results["bn"][Path(model).stem] = bn
                print(f"  {Path(model).stem:10s} loss rel. diff {bn['loss_rel_diff']:.2e}, gradient rel. diff "
                      f"{bn['grad_rel_diff']:.3f} (cosine {bn['grad_cosine']:.4f}); BatchNorm = "
                      f"{100 * bn['bn_share_of_forward']:.2f}% of the forward")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if not all(r["same_weights"] for r in results["rows"]):
            raise SystemExit("weights differed between ranks")


if __name__ == "__main__":
    main()
