"""``clipret embed`` against a naive PIL + open_clip loop, side by side, whole processes.

Writes (once, cached under ``--cache``) ``--n`` seeded photo-like JPEGs of
2000×1500 px at quality 90: a smooth colour gradient, luminance-correlated
low-frequency noise, a few flat shapes with hard edges, and per-pixel colour
grain, so each is a large file with real entropy (about 0.65 MB). Then it
runs, as subprocesses (imports and model building count on both sides),
``--repeats`` times each, interleaved:

* naive: a script that builds the model with ``open_clip.create_model_and_transforms
  (M, pretrained=None)``, opens each file with PIL, applies the model's own
  preprocess and runs ``encode_image`` batch by batch, sequentially, under
  ``torch.no_grad`` (bf16 autocast on CUDA, as ``clipret embed --amp auto``);
* clipret: ``python -m clipret embed DIR --model M --pretrained none --out x.npy``
  with the same batch size, device and precision.

It prints wall time and img/s of each, the ratio naive / clipret (above 1:
clipret is faster), the mean and min cosine between the two outputs row by
row (the naive side seeds torch with 0 before building, as clipret's
``open_encoder`` does for ``--pretrained none``, so both hold the same random
weights and should agree to ~1e-6 in fp32), and the naive loop's own time
split (imports, model build, decode, preprocess, forward): where the time goes.

    flock /tmp/clipret-bench.lock python bench/embed.py --model-preset tiny --device cpu
    flock /tmp/clipret-bench.lock python bench/embed.py --model-preset vit-b-32 --n 200 --device cpu
    python bench/embed.py --model ViT-L-14 --n 400 --device cuda --json embed-l14.json

``--steady`` measures steady-state rates instead (decode only, forward only, the whole embed; at
least 20,000 images per set by default): see bench/embed_steady.py.

    python bench/embed.py --steady --model ViT-L-14 --device cuda --json steady-l14.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": str(ROOT / "clipret" / "configs" / "tiny-vit.json"), "vit-b-32": "ViT-B-32"}

NAIVE = r'''
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np, torch, open_clip
from PIL import Image
folder, model, out, batch_size, device, amp = sys.argv[1:7]
batch_size = int(batch_size)
t_imports = time.perf_counter()
if model.endswith(".json"):
    open_clip.add_model_config(model)
    model = os.path.splitext(os.path.basename(model))[0]
torch.manual_seed(0)  # what clipret's open_encoder does for --pretrained none: the same random weights
net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
dev = torch.device(device)
if amp == "auto":
    amp = "bf16" if dev.type == "cuda" else "none"
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
net = net.to(dev).eval()
names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
t_built = time.perf_counter()
decode = prep = fwd = 0.0
chunks = []
for start in range(0, len(names), batch_size):
    xs = []
    for name in names[start:start + batch_size]:
        a = time.perf_counter()
        im = Image.open(os.path.join(folder, name))
        im.load()
        b = time.perf_counter()
        xs.append(preprocess(im))
        decode, prep = decode + b - a, prep + time.perf_counter() - b
    a = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        emb = net.encode_image(torch.stack(xs).to(dev), normalize=True)
    chunks.append(emb.float().cpu().numpy())
    fwd += time.perf_counter() - a
np.save(out, np.concatenate(chunks))
end = time.perf_counter()
json.dump({"ids": names, "imports_s": t_imports - t0, "build_s": t_built - t_imports, "decode_s": decode,
           "preprocess_s": prep, "forward_s": fwd, "in_process_s": end - t0}, open(out[:-4] + ".json", "w"))
'''


def _noise_field(rng: np.random.Generator, cells: int, size: tuple[int, int], amp: float) -> np.ndarray:
    """(h, w, 3) float32 smooth noise of std about ``amp``, mostly shared by the three channels."""
    from PIL import Image

    w, h = size
    shape = (cells, max(2, cells * w // h), 1)
    coarse = rng.normal(0.0, 1.0, shape) + 0.4 * rng.normal(0.0, 1.0, shape[:2] + (3,))
    grid = Image.fromarray(np.clip(coarse * 40 + 128, 0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    return (np.asarray(grid, np.float32) - 128) * (amp / 40)


def make_photo(index: int, seed: int = 0, width: int = 2000, height: int = 1500):
    """A deterministic photo-like RGB ``PIL.Image`` (width × height), a pure function of (index, seed)."""
    from PIL import Image, ImageChops, ImageDraw

    rng = np.random.default_rng([seed, index])
    lw, lh = max(8, width // 8), max(6, height // 8)  # compose the smooth part at 1/8 size, then upsample
    y = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, lw, dtype=np.float32)[None, :, None]
    angle = rng.uniform(0, 2 * np.pi)
    c0, c1 = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    t = np.cos(angle) * x + np.sin(angle) * y
    low = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
    low = low + _noise_field(rng, 4, (lw, lh), 35.0) + _noise_field(rng, 24, (lw, lh), 8.0)
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    grain = Image.fromarray(rng.integers(128 - 10, 128 + 11, (height, width, 3), dtype=np.uint8))
    return ImageChops.add(img, grain, scale=1.0, offset=-128)


def _write_photo(job: tuple[Path, int, int, int, int, int]) -> None:
    path, index, seed, width, height, quality = job
    tmp = path.with_suffix(".tmp")
    make_photo(index, seed, width, height).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_photos(cache: Path, n: int, seed: int, width: int, height: int, quality: int) -> tuple[Path, float]:
    """The folder of ``n`` photos (generated where missing, in parallel); returns (folder, seconds spent)."""
    from multiprocessing import get_context

    folder = cache / f"n{n}-{width}x{height}-q{quality}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img_{i:05d}.jpg", i, seed, width, height, quality) for i in range(n)]
    jobs = [j for j in jobs if not j[0].is_file() and not _link_from_sibling(j[0])]
    t = time.perf_counter()
    if len(jobs) > 4:
        with get_context("spawn").Pool(min(len(os.sched_getaffinity(0)), 16)) as pool:
            pool.map(_write_photo, jobs, chunksize=4)
    else:
        for job in jobs:
            _write_photo(job)
    return folder, time.perf_counter() - t


def _link_from_sibling(path: Path) -> bool:
    """Hard-link ``path`` from a cached set of another size with the same settings (a photo depends on its index only)."""
    settings = path.parent.name.split("-", 1)[1]
    for other in path.parent.parent.glob(f"n*-{settings}"):
        if other != path.parent and (other / path.name).is_file():
            try:
                os.link(other / path.name, path)
                return True
            except OSError:
                return False
    return False


def _run(cmd: list[str], what: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{what} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return took


def _rows_by_id(npy: Path) -> dict[str, np.ndarray]:
    vectors = np.load(npy)
    ids = json.loads(npy.with_suffix(".json").read_text())["ids"]
    return dict(zip(ids, vectors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--model", help="any open_clip model name or config JSON (overrides --model-preset)")
    ap.add_argument("--steady", action="store_true", help="steady-state rates: decode, forward, whole (bench/embed_steady.py)")
    ap.add_argument("--n", type=int, help="number of JPEGs (default 1,000; with --steady 20,000 per set)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, help="default 64; with --steady clipret's own (256 on CUDA, 64 on CPU)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (both sides)")
    ap.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, none on CPU), bf16 or none (both sides)")
    ap.add_argument("--workers", type=int, help="clipret --workers (default: clipret's automatic choice)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of each side; the median is reported")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clipret-bench/embed"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    import embed_steady

    embed_steady.add_arguments(ap)
    args = ap.parse_args()
    model = args.model or PRESETS[args.model_preset]
    if args.steady:
        args.n = args.n or 20_000
        result = embed_steady.run(args, model)
        embed_steady.print_table(result)
        if args.json:
            from clipret.artifacts import write_json

            write_json(args.json, result)
        return
    args.n, args.batch_size = args.n or 1000, args.batch_size or 64

    from clipret import runtime  # light: no torch

    folder, gen_s = ensure_photos(args.cache, args.n, args.seed, args.width, args.height, args.quality)
    mb = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 1e6
    for p in folder.glob("*.jpg"):  # warm the page cache so neither side pays for the disk
        p.read_bytes()
    workers = runtime.resolve_workers(args.workers, args.n)
    work = Path(tempfile.mkdtemp(prefix="clipret-bench-embed-"))
    naive_out, ours_out = work / "naive.npy", work / "clipret.npy"
    naive_cmd = [sys.executable, "-c", NAIVE, str(folder), model, str(naive_out), str(args.batch_size), args.device, args.amp]
    ours_cmd = [sys.executable, "-m", "clipret", "embed", str(folder), "--model", model, "--pretrained", "none",
                "--out", str(ours_out), "--batch-size", str(args.batch_size), "--device", args.device, "--amp", args.amp]
    if args.workers is not None:
        ours_cmd += ["--workers", str(args.workers)]
    times: dict[str, list[float]] = {"naive": [], "clipret": []}
    try:
        for rep in range(args.repeats):
            order = ("naive", "clipret") if rep % 2 == 0 else ("clipret", "naive")
            for side in order:
                times[side].append(_run(naive_cmd if side == "naive" else ours_cmd, side))
        naive, ours = _rows_by_id(naive_out), _rows_by_id(ours_out)
        split = json.loads(naive_out.with_suffix(".json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common = sorted(set(naive) & set(ours))
    cos = np.einsum("nd,nd->n", np.stack([naive[i] for i in common]), np.stack([ours[i] for i in common]))
    t_naive, t_ours = statistics.median(times["naive"]), statistics.median(times["clipret"])
    result = {
        "model": model, "n": args.n, "image": f"{args.width}x{args.height} q{args.quality}", "mb": round(mb, 1),
        "batch_size": args.batch_size, "device": args.device, "amp": args.amp, "clipret_workers": workers,
        "repeats": args.repeats, "cpus": runtime.available_cpus(), "gpu": _gpu_name(args.device),
        "naive_s": t_naive, "clipret_s": t_ours, "ratio_naive_over_clipret": t_naive / t_ours,
        "naive_img_s": args.n / t_naive, "clipret_img_s": args.n / t_ours,
        "rows_compared": len(common), "rows_naive": len(naive), "rows_clipret": len(ours),
        "cosine_mean": float(cos.mean()) if len(cos) else float("nan"), "cosine_min": float(cos.min()) if len(cos) else float("nan"),
        "naive_split_s": {k: v for k, v in split.items() if k.endswith("_s")}, "generate_s": gen_s,
    }
    _print(result)
    if args.json:
        from clipret.artifacts import write_json

        write_json(args.json, result)


def _gpu_name(device: str) -> str | None:
    if device == "cpu":
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False, capture_output=True, text=True) \
        if shutil.which("nvidia-smi") else None
    return r.stdout.strip().splitlines()[0] if r is not None and r.returncode == 0 and r.stdout.strip() else None


def _print(r: dict) -> None:
    print(f"embed: {r['n']} JPEGs {r['image']} ({r['mb']} MB), model {Path(r['model']).stem if r['model'].endswith('.json') else r['model']}, batch {r['batch_size']}, "
          f"device {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}, amp {r['amp']}, "
          f"clipret workers {r['clipret_workers']}, {r['cpus']} CPUs, median of {r['repeats']}")
    print(f"  {'':44s} {'wall s':>8s} {'img/s':>8s}")
    print(f"  {'naive loop (PIL + open_clip, sequential)':44s} {r['naive_s']:8.2f} {r['naive_img_s']:8.1f}")
    print(f"  {'clipret embed':44s} {r['clipret_s']:8.2f} {r['clipret_img_s']:8.1f}")
    print(f"  ratio naive / clipret: {r['ratio_naive_over_clipret']:.2f}x  (above 1: clipret is faster)")
    flag = "" if r["cosine_mean"] >= 0.999 and r["rows_compared"] == r["n"] else "   <-- EMBEDDINGS DIFFER"
    print(f"  agreement: mean cosine {r['cosine_mean']:.6f}, min {r['cosine_min']:.6f} over {r['rows_compared']} rows{flag}")
    s = r["naive_split_s"]
    total = s["in_process_s"]
    parts = ", ".join(f"{k[:-2]} {s[k]:.1f} s ({100 * s[k] / total:.0f}%)"
                      for k in ("imports_s", "build_s", "decode_s", "preprocess_s", "forward_s"))
    print(f"  naive loop, in process: {parts}")


if __name__ == "__main__":
    main()
