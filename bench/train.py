"""Training throughput, peak memory and where a step's time goes, built from clipret's own parts.

For each model and variant it builds ``build_encoder(make_spec(M, "none"))``
(random weights), the AdamW param groups of ``clipret.training.llrd.param_groups``
(fused on CUDA, as ``clipret train``), ``clipret.training.losses.Objective``
with its miner on, and a fixed synthetic P×K batch already on the device (no
image decoding: the point is the step). Then it times, with a CUDA
synchronisation around each timed part:

* the full step, as ``clipret train`` does it: forward (autocast for bf16),
  Circle loss on mined pairs, backward, gradient clipping, AdamW step. img/s = P*K / step;
* the bare step: the same with a trivial linear loss instead of loss + miner,
  split into forward, backward and optimizer;
* the Circle loss alone (forward + backward to the embeddings), the miner alone;
* the P×K sampler: ``PKBatchSampler`` (with draw numbers, as training uses it)
  over ``--n-images`` labels in ``--n-classes`` classes (SOP-sized by default),
  whole epochs, per batch, epoch planning included.

Loss, miner, sampler and full step are printed as ratios to the bare step,
and each variant's img/s and peak memory as ratios to the first variant.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak
RSS on CPU (each variant then runs in its own process, so peaks do not mix).

Variants are ``+``-joined flags: ``fp32`` (plain: torch's defaults, so on
CUDA TF32 convolutions but fp32 matmuls), ``tf32`` (TF32 matmuls), ``bf16``
(bf16 autocast), ``ckpt`` (open_clip's ``set_grad_checkpointing`` on the
image tower inside clipret's model), ``compile`` (``torch.compile`` of the
model; its compile time goes into the warm-up). For ``ckpt`` the script counts the
blocks that really went through ``torch.utils.checkpoint`` in one forward of
clipret's model, so a wrapper that bypasses the tower's transformer shows up
as ``0/L``.

Model FLOP utilisation (MFU): the FLOPs of one full training step (forward,
loss, backward), counted with ``torch.utils.flop_counter.FlopCounterMode`` on
the eager model without checkpointing (model FLOPs: a checkpointed forward's
recomputation is not counted), divided by the step time and by the card's dense
peak for the variant's precision (:data:`PEAK_TFLOPS`, or ``--peak-tflops``).
On the CPU it prints the FLOPs and the achieved FLOP/s; MFU is n/a.

    flock /tmp/clipret-bench.lock python bench/train.py --model-preset tiny vit-b-32 --device cpu --p 8 --k 4 --steps 3
    python bench/train.py --model ViT-L-14 --device cuda --p 32 --k 4 --variants fp32,bf16,bf16+ckpt --json l14.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from mfu import PEAK_TFLOPS, card_of, count_flops, peak_tflops

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": str(ROOT / "clipret" / "configs" / "tiny-vit.json"), "vit-b-32": "ViT-B-32"}
FLAGS = {"fp32", "tf32", "bf16", "ckpt", "compile"}

def parse_variant(name: str) -> set[str]:
    flags = set(name.split("+"))
    if not flags <= FLAGS:
        sys.exit(f"unknown variant {name!r}: join {', '.join(sorted(FLAGS))} with '+'")
    return flags


def find_visual(model: Any) -> tuple[Any, str]:
    """The open_clip image tower inside a clipret encoder, and its attribute path."""
    for path in ("tower.visual", "visual"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "set_grad_checkpointing"):
            return obj, path
    for name, module in model.named_modules():
        if type(module).__name__ in {"VisionTransformer", "ModifiedResNet"}:
            return module, name
    raise RuntimeError("no open_clip image tower found in the model")


def checkpointed_blocks(model: Any, images: Any) -> int:
    """How many ``torch.utils.checkpoint`` calls open_clip's transformer makes in one forward of ``model``."""
    import open_clip.transformer as oct
    import torch

    original, calls = oct.checkpoint, [0]

    def counting(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return original(*a, **kw)

    oct.checkpoint = counting
    try:
        with torch.no_grad():
            model(images[:2])  # 2 rows: the head's BatchNorm refuses a batch of 1 in train mode
    finally:
        oct.checkpoint = original
    return calls[0]


def _timed(fn: Callable[[], Any], n: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``n`` calls of ``fn``, each fenced by ``sync``."""
    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_variant(model_name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one (model, variant); returns a result row (``error`` set on failure)."""
    import torch

    from clipret.model.build import build_encoder, make_spec
    from clipret.training.llrd import param_groups
    from clipret.training.losses import Objective

    flags = parse_variant(variant)
    device = torch.device(args.device)
    gc.collect()  # the previous variant's model and optimizer, when run in this process
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row: dict[str, Any] = {"model": model_name, "variant": variant, "p": args.p, "k": args.k}
    base = 0.0 if cuda else _peak_rss()  # CPU: the peak so far (imports), subtracted below
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in flags
    try:
        torch.manual_seed(0)
        spec = make_spec(model_name, "none", image_size=args.image_size)
        net = build_encoder(spec).to(device).train()
        size = spec.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        batch = args.p * args.k
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(batch, 3, h, w, generator=gen).to(device)
        labels = torch.arange(args.p, device=device).repeat_interleave(args.k)
        row.update(image_size=[h, w], params_m=sum(p.numel() for p in net.parameters()) / 1e6)
        groups = param_groups(net, 4e-4, 0.05, 0.65, 10.0)
        opt = torch.optim.AdamW(groups, lr=4e-4, weight_decay=0.05, fused=cuda)
        objective = Objective(mine_from_epoch=1)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in flags else nullcontext
        model = net  # what the steps call: the model, or its torch.compile wrapper

        def full_step() -> None:
            with autocast():
                emb = model(images)
            loss, _ = objective(emb, labels, 10**6)  # a late epoch: the miner is on
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()

        row["flops"] = count_flops(full_step)  # eager, no checkpointing: the model's own FLOPs
        if "ckpt" in flags:
            visual, where = find_visual(net)
            visual.set_grad_checkpointing(True)
            blocks = len(getattr(getattr(visual, "transformer", None), "resblocks", []))
            row["ckpt"] = {"tower": type(visual).__name__, "at": where, "blocks": blocks,
                           "checkpointed": checkpointed_blocks(net, images)}
        if "compile" in flags:
            model = torch.compile(net)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t_warm = time.perf_counter()
        for _ in range(args.warmup_steps):
            full_step()
        sync()
        row["warmup_s"] = time.perf_counter() - t_warm
        step = _timed(full_step, args.steps, sync)
        row["tflops_s"] = row["flops"] / step / 1e12
        peak = peak_tflops(_gpu_name() if cuda else None, flags, args.peak_tflops) if cuda or args.peak_tflops else None
        row.update(peak_tflops=peak, mfu=row["tflops_s"] / peak if peak else None)
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss() - base) / 2**20

        weights = torch.randn(batch, net.embed_dim, generator=gen).to(device)
        parts: list[tuple[float, float, float]] = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            with autocast():
                emb = model(images)
            sync()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            (emb.float() * weights).sum().backward()
            sync()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sync()
            parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        fwd, bwd, optim = (statistics.median(x) for x in zip(*parts))
        bare = statistics.median(sum(x) for x in parts)

        with torch.no_grad(), autocast():
            emb = net(images).float()
        emb.requires_grad_(True)

        def loss_only() -> None:
            emb.grad = None
            objective.loss(emb, labels).backward()

        loss_s = _timed(loss_only, args.steps, sync)
        miner_s = _timed(lambda: objective.miner(emb, labels), args.steps, sync)
        row.update(step_s=step, img_s=batch / step, bare_s=bare, fwd_s=fwd, bwd_s=bwd, opt_s=optim,
                   loss_s=loss_s, miner_s=miner_s)
    except Exception as exc:  # noqa: BLE001 - one failing variant (OOM, say) must not sink the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def _peak_rss() -> float:
    """This process's peak resident set size, in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def sampler_cost(n_images: int, n_classes: int, p: int, k: int, epochs: int = 2) -> dict[str, float]:
    """Seconds per batch of ``PKBatchSampler`` over whole epochs (planning included), on synthetic labels."""
    from clipret.data.sampler import PKBatchSampler

    labels = np.random.default_rng(0).integers(0, n_classes, n_images)
    sampler = PKBatchSampler(labels, min(p, len(np.unique(labels))), k, seed=0, with_draws=True)
    t, batches = time.perf_counter(), 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += sum(1 for _ in sampler)
    return {"per_batch_s": (time.perf_counter() - t) / max(batches, 1), "batches_per_epoch": batches / epochs}


def _isolated(model_name: str, variant: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--model", model_name, *argv]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]
        return {"model": model_name, "variant": variant, "error": f"worker exit {r.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def _print(rows: list[dict[str, Any]], sampler: dict[str, float], device: str, header: str) -> None:
    print(header)
    print(f"  sampler: {1e3 * sampler['per_batch_s']:.3f} ms per P×K batch "
          f"({sampler['batches_per_epoch']:.0f} batches per epoch, epoch planning included)")
    mem = "peak GiB (cuda alloc)" if device.startswith("cuda") else "peak GiB (RSS-imports)"
    head = f"  {'model':14s} {'variant':11s} {'img/s':>8s} {'x first':>7s} {mem:>21s} {'x first':>7s} {'step ms':>8s} " \
           f"{'bare ms':>8s} {'fwd/bwd/opt %':>13s} {'full/bare':>9s} {'loss/bare':>9s} {'miner/bare':>10s} {'sampler/bare':>12s} " \
           f"{'GFLOP/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s}  ckpt"
    print(head)
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        first = next((r for r in group if "error" not in r), None)
        for r in group:
            name = _short(model)
            if "error" in r:
                print(f"  {name:14s} {r['variant']:11s} {r['error']}")
                continue
            split = "/".join(f"{100 * r[k] / (r['fwd_s'] + r['bwd_s'] + r['opt_s']):.0f}" for k in ("fwd_s", "bwd_s", "opt_s"))
            ck = r.get("ckpt")
            ck_txt = f"{ck['checkpointed']}/{ck['blocks']} blocks ({ck['tower']} at .{ck['at']})" if ck else ""
            print(f"  {name:14s} {r['variant']:11s} {r['img_s']:8.1f} {r['img_s'] / first['img_s']:7.2f} "
                  f"{r['peak_mib'] / 1024:21.2f} {_ratio(r['peak_mib'], first['peak_mib']):>7s} {1e3 * r['step_s']:8.1f} "
                  f"{1e3 * r['bare_s']:8.1f} {split:>13s} {r['step_s'] / r['bare_s']:9.3g} {r['loss_s'] / r['bare_s']:9.3g} "
                  f"{r['miner_s'] / r['bare_s']:10.3g} {sampler['per_batch_s'] / r['bare_s']:12.3g} "
                  f"{r['flops'] / 1e9:10.4g} {r['tflops_s']:8.3g} {_mfu(r):>6s}  {ck_txt}")
            if ck and ck["checkpointed"] < max(ck["blocks"], 1):
                print(f"    WARNING: grad checkpointing reached {ck['checkpointed']} of {ck['blocks']} blocks through clipret's model")


def _mfu(row: dict[str, Any]) -> str:
    """The row's MFU as a percentage, or "n/a" (CPU, or a card without a known peak: pass --peak-tflops)."""
    return f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"


def _ratio(a: float, b: float) -> str:
    """a / b to two decimals, or "n/a" when b is 0 (a CPU peak-RSS increase too small to see)."""
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-preset", nargs="+", choices=sorted(PRESETS), default=["tiny"])
    ap.add_argument("--model", action="append", help="an open_clip model name or config JSON (repeatable; replaces the presets)")
    ap.add_argument("--variants", help="comma-separated, e.g. fp32,bf16,bf16+ckpt (default: fp32,ckpt on CPU; fp32,bf16,bf16+ckpt on CUDA)")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed repetitions of each part (the median is kept)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--image-size", type=int, help="input size (default: the model's own)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-images", type=int, default=60000, help="labels the sampler is timed on")
    ap.add_argument("--n-classes", type=int, default=11318)
    ap.add_argument("--in-process", action="store_true", help="on CPU too (peak RSS then accumulates across variants)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense peak TFLOP/s for MFU (default: the table, by GPU name)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from clipret import runtime

    args.device = str(runtime.resolve_device(args.device))
    if args._worker:
        print("RESULT " + json.dumps(run_variant(args.model[0], args._worker, args)), flush=True)
        return
    cuda = args.device.startswith("cuda")
    variants = (args.variants or ("fp32,bf16,bf16+ckpt" if cuda else "fp32,ckpt")).split(",")
    for v in variants:
        parse_variant(v)
    models = args.model or [PRESETS[m] for m in args.model_preset]
    isolate = not cuda and not args.in_process
    argv = [f"--p={args.p}", f"--k={args.k}", f"--steps={args.steps}", f"--warmup-steps={args.warmup_steps}",
            f"--device={args.device}"] + ([f"--image-size={args.image_size}"] if args.image_size else []) \
        + ([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else [])
    sampler = sampler_cost(args.n_images, args.n_classes, args.p, args.k)
    rows = []
    for model in models:
        for v in variants:
            row = _isolated(model, v, argv) if isolate else run_variant(model, v, args)
            print(f"  done {_short(model)} {v}: " + (row.get("error") or f"{row['img_s']:.1f} img/s"), flush=True)
            rows.append(row)
    gpu = _gpu_name() if cuda else None
    header = (f"train step: P×K = {args.p}×{args.k}, device {args.device}{' (' + gpu + ')' if gpu else ''}, "
              f"{runtime.available_cpus()} CPUs, median of {args.steps} after {args.warmup_steps} warm-up steps"
              + ("" if isolate or cuda else "; peak RSS accumulates across variants (--in-process)")
              + (f"\n  MFU against the dense peak TFLOP/s of {card_of(gpu) or 'an unknown card'}: "
                 + (f"{args.peak_tflops} (--peak-tflops)" if args.peak_tflops else
                    ", ".join(f"{k} {v}" for k, v in PEAK_TFLOPS[card_of(gpu)].items()) if card_of(gpu) else "n/a (pass --peak-tflops)")
                 if cuda else "\n  MFU n/a on the CPU (FLOPs per step and achieved TFLOP/s are printed)"))
    _print(rows, sampler, args.device, header)
    if args.json:
        from clipret.artifacts import write_json

        write_json(args.json, {"device": args.device, "gpu": gpu, "card": card_of(gpu), "peak_tflops": args.peak_tflops,
                               "cpus": runtime.available_cpus(), "p": args.p, "k": args.k,
                               "steps": args.steps, "warmup_steps": args.warmup_steps, "sampler": sampler, "rows": rows})


def _short(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
