"""Steady-state embedding throughput: decode only, forward only and the whole ``clipret embed``, side by side.

``python bench/embed.py --steady ...`` runs this. For each image set (default: 640×480 JPEGs,
typical of datasets, and 2000×1500 photos, both quality 90, from bench/embed.py's generator) it
builds a folder of ``--n`` files (default 20,000; ``--distinct`` of them generated, the rest hard
links to those, so the set is quick to make and the page cache holds it), reads every file once,
then measures in this process, each rate counted after the first ``--warm`` fraction of the
images (so start-up, the first batches and the imports do not count):

* decode only: clipret's loader alone (:func:`clipret.embedding.batches.load_batches`, the model's
  preprocessing, batches delivered on the device), for each decode path: ``pil`` (PIL in loader
  workers, reduced-scale JPEG decoding) and ``gpu`` (workers read bytes; nvJPEG decodes and the
  device resizes; on the CPU device torchvision's libjpeg in the main process);
* forward only: random (B, 3, H, W) batches already on the device through ``encode_batch``, once
  per model (the input size does not depend on the set), for each ``--forward-variants``:
  ``plain``, ``channels_last`` (model and input), ``compile`` (``torch.compile``; its compile time
  is reported apart);
* whole: ``clipret.Encoder.embed_folder`` (what ``clipret embed`` runs, writing the .npy), for each
  ``--whole`` path (``auto``: clipret's own choice; ``pil``; ``gpu``), timed from its progress calls.

It also embeds the first ``--check`` images through both decode paths and prints the cosine between
them (the device path must stay >= 0.999), and names the limit: the slower of decode (best
decode-only rate) and compute (forward-only rate), when the whole embed reaches 80 % of it.

    python bench/embed.py --steady --model ViT-B-32 --device cuda --json steady-b32.json
    python bench/embed.py --steady --model-preset tiny --device cpu --n 400 --distinct 100 --sets 640x480
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATH_ENV = {"auto": "auto", "pil": "0", "gpu": "1"}  # --whole path -> CLIPRET_GPU_DECODE


def parse_sets(text: str) -> list[tuple[int, int]]:
    """``"640x480,2000x1500"`` -> [(640, 480), (2000, 1500)] (width, height)."""
    sets = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        sets.append((int(w), int(h)))
    return sets


def steady_rate(marks: list[tuple[float, int]], warm: float) -> float:
    """Images per second after the first ``warm`` fraction: ``marks`` are (seconds, images done so far)
    in order, the last one the end; the rate is counted from the first mark at or past the fraction."""
    total = marks[-1][1]
    start = next((m for m in marks if m[1] >= warm * total and m[1] < total), marks[0])
    return (total - start[1]) / max(marks[-1][0] - start[0], 1e-9)


def ensure_set(cache: Path, n: int, distinct: int, seed: int, width: int, height: int, quality: int) -> Path:
    """A folder of ``n`` JPEGs: ``distinct`` generated photos, file i a hard link to photo i % distinct."""
    from embed import ensure_photos

    distinct = max(1, min(distinct, n))
    source, _ = ensure_photos(cache, distinct, seed, width, height, quality)
    folder = cache / f"steady-n{n}-d{distinct}-{width}x{height}-q{quality}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        if not path.is_file():
            original = source / f"img_{i % distinct:05d}.jpg"
            try:
                os.link(original, path)
            except OSError:
                shutil.copyfile(original, path)
    for p in source.glob("*.jpg"):  # warm the page cache: no path pays for the disk
        p.read_bytes()
    return folder


def decode_only(folder: Path, ids: list[str], transform: Any, path: str, device: Any, args: argparse.Namespace,
                decode_side: int | None) -> float:
    """img/s of the loader alone, batches delivered on ``device``, through decode ``path`` (pil or gpu)."""
    import torch

    from clipret.embedding.batches import load_batches

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [list(range(s, min(s + args.batch_size, len(ids)))) for s in range(0, len(ids), args.batch_size)]
    marks, done = [(time.perf_counter(), 0)], 0
    for batch in load_batches(folder, ids, batches, transform, workers=args.workers, device=device,
                              decode_side=decode_side, gpu_decode=path == "gpu"):
        done += len(batch["indices"]) + len(batch["errors"])
        if done >= args.warm * len(ids) or done == len(ids):
            sync()
        marks.append((time.perf_counter(), done))
    return steady_rate(marks, args.warm)


def forward_only(module: Any, preprocess: dict[str, Any], device: Any, amp: Any, variant: str,
                 args: argparse.Namespace) -> dict[str, float]:
    """img/s of ``encode_batch`` on random batches already on ``device`` (``args.n`` images after 3 warm-up batches)."""
    import torch

    from clipret.embedding.batches import encode_batch

    size = preprocess["size"]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(args.batch_size, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    net, extra = module, {}
    if variant == "channels_last":
        net, x = module.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    elif variant == "compile":
        net = torch.compile(module)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        t = time.perf_counter()
        for _ in range(3):
            encode_batch(net, x, device, amp)
        sync()
        extra["warmup_s"] = time.perf_counter() - t
        steps = max(1, -(-args.n // args.batch_size))
        t = time.perf_counter()
        for _ in range(steps):
            encode_batch(net, x, device, amp)
        sync()
        return {"img_s": steps * args.batch_size / (time.perf_counter() - t), **extra}
    finally:
        if variant == "channels_last":
            module.to(memory_format=torch.contiguous_format)


def whole(encoder: Any, folder: Path, path: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``Encoder.embed_folder`` with decode ``path``; its steady img/s (from progress calls) and wall seconds."""
    marks: list[tuple[float, int]] = []
    saved = os.environ.get("CLIPRET_GPU_DECODE")
    os.environ["CLIPRET_GPU_DECODE"] = PATH_ENV[path]
    try:
        t = time.perf_counter()
        marks.append((t, 0))
        out = encoder.embed_folder(folder, out=work / f"{path}.npy", batch_size=args.batch_size, workers=args.workers,
                                   progress=lambda stage, done, total: marks.append((time.perf_counter(), done)))
        marks.append((time.perf_counter(), len(out) + len(out.skipped)))
    finally:
        if saved is None:
            os.environ.pop("CLIPRET_GPU_DECODE", None)
        else:
            os.environ["CLIPRET_GPU_DECODE"] = saved
    return {"img_s": steady_rate(marks, args.warm), "wall_s": marks[-1][0] - t, "rows": len(out)}


def agreement(module: Any, folder: Path, ids: list[str], transform: Any, device: Any, amp: Any,
              decode_side: int | None, batch_size: int) -> dict[str, float]:
    """Mean and min cosine between the device decode path's embeddings and the PIL path's, row by row."""
    from clipret.embedding.batches import embed_images

    a, kept_a, _ = embed_images(module, folder, ids, transform, batch_size=batch_size, device=device, amp=amp,
                                decode_side=decode_side, gpu_decode=False)
    b, kept_b, _ = embed_images(module, folder, ids, transform, batch_size=batch_size, device=device, amp=amp,
                                decode_side=decode_side, gpu_decode=True)
    assert kept_a == kept_b, "the two decode paths kept different images"
    cos = np.einsum("nd,nd->n", a, b)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "rows": int(len(cos))}


def limit_of(row: dict[str, Any], forward: float) -> str:
    """What holds the whole embed back: the slower of decode (the best decode-only rate) and compute
    (the forward-only rate), when the best whole rate reaches 80 % of it; else that, marked as overhead."""
    best_whole = max(r["img_s"] for r in row["whole"].values())
    best_decode = max(row["decode"].values(), default=float("inf"))
    name, bound = ("decode", best_decode) if best_decode < forward else ("compute", forward)
    return name if best_whole >= 0.8 * bound else f"{name}? whole at {best_whole / bound:.2f}x of it (pipeline overhead)"


def run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Every measurement of one model; returns the result dict that :func:`print_table` prints."""
    import torch

    import clipret
    from clipret import runtime
    from clipret.data.decode import decode_side_for
    from clipret.data.transforms import eval_transform

    device = runtime.resolve_device(args.device)
    amp = runtime.resolve_amp(args.amp, device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.workers = runtime.resolve_workers(args.workers, args.n)
    paths = [] if args.paths == "none" else (args.paths or ("pil,gpu" if cuda else "pil")).split(",")
    whole_paths = (args.whole or "auto").split(",")
    torch.manual_seed(0)
    encoder = clipret.Encoder.load(model, "none", device=str(device), amp=args.amp)
    module = encoder.module.to(device).eval()
    transform, side = eval_transform(encoder.spec.preprocess), decode_side_for(encoder.spec.preprocess["size"])
    from embed import _gpu_name

    result: dict[str, Any] = {
        "model": model, "n": args.n, "distinct": args.distinct, "batch_size": args.batch_size, "workers": args.workers,
        "device": str(device), "gpu": _gpu_name(str(device)) if cuda else None, "amp": str(amp), "warm": args.warm,
        "cpus": runtime.available_cpus(), "forward": {}, "sets": [],
    }
    for variant in args.forward_variants.split(","):
        result["forward"][variant] = forward_only(module, encoder.spec.preprocess, device, amp, variant, args)
    forward = max(v["img_s"] for v in result["forward"].values())
    work = Path(tempfile.mkdtemp(prefix="clipret-bench-steady-"))
    try:
        for width, height in parse_sets(args.sets):
            folder = ensure_set(args.cache, args.n, args.distinct, args.seed, width, height, args.quality)
            ids = sorted(p.name for p in folder.glob("*.jpg"))
            row: dict[str, Any] = {"set": f"{width}x{height}", "decode": {}, "whole": {}}
            for path in paths:
                row["decode"][path] = decode_only(folder, ids, transform, path, device, args, side)
            for path in whole_paths:
                row["whole"][path] = whole(encoder, folder, path, args, work)
            if args.check:
                row["cosine"] = agreement(module, folder, ids[: args.check], transform, device, amp, side, args.batch_size)
            row["limit"] = limit_of(row, forward)
            result["sets"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_table(r: dict[str, Any]) -> None:
    name = Path(r["model"]).stem if r["model"].endswith(".json") else r["model"]
    print(f"steady state: {name}, {r['n']} images a set ({r['distinct']} distinct), batch {r['batch_size']}, device "
          f"{r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}, amp {r['amp']}, {r['workers']} loader workers, "
          f"{r['cpus']} CPUs; rates after the first {100 * r['warm']:.0f} %")
    fwd = max(v["img_s"] for v in r["forward"].values())
    print("  forward only (batches already on the device): " + ", ".join(
        f"{k} {v['img_s']:,.1f} img/s" + (f" (warm-up {v['warmup_s']:.1f} s)" if k == "compile" else "")
        for k, v in r["forward"].items()))
    for row in r["sets"]:
        dec = ", ".join(f"{k} {v:,.1f}" for k, v in row["decode"].items()) or "not run"
        who = ", ".join(f"{k} {v['img_s']:,.1f} ({v['img_s'] / fwd:.2f}x forward; wall {v['wall_s']:.1f} s)"
                        for k, v in row["whole"].items())
        print(f"  {row['set']:>10s}  decode only img/s: {dec}  |  whole clipret embed img/s: {who}  |  limit: {row['limit']}")
        if "cosine" in row:
            c = row["cosine"]
            flag = "" if c["min"] >= 0.999 else "   <-- BELOW 0.999"
            print(f"  {'':>10s}  device decode vs PIL on {c['rows']} images: mean cosine {c['mean']:.6f}, min {c['min']:.6f}{flag}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The --steady options (bench/embed.py shares --model, --device, --amp, --batch-size, --workers, --json...)."""
    ap.add_argument("--sets", default="640x480,2000x1500", help="--steady: image sets, WIDTHxHEIGHT, comma-separated")
    ap.add_argument("--distinct", type=int, default=2000, help="--steady: generated photos per set; the rest are links")
    ap.add_argument("--paths", help="--steady: decode-only paths, pil,gpu or none (default: pil,gpu on CUDA, pil on CPU)")
    ap.add_argument("--whole", help="--steady: whole-embed paths, auto,pil,gpu (default: auto)")
    ap.add_argument("--forward-variants", default="plain", help="--steady: plain,channels_last,compile")
    ap.add_argument("--warm", type=float, default=0.1, help="--steady: fraction of images not counted (start-up)")
    ap.add_argument("--check", type=int, default=256, help="--steady: images embedded through both decode paths (0: skip)")
