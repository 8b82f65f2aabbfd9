"""How far is exact full-ranking evaluation from its floor, a bare chunked matmul?

Generates (or reuses, under --cache) clustered, labelled unit vectors: Q
queries and a G-item gallery of dimension D, as .npy files with clipret
manifests and one labels.csv. Then, in one run and as whole processes:

  (a) floor: a bare script that memory-maps both arrays and computes every
      query-gallery score once, with a chunked matmul (same chunk size);
  (b) ours: ``clipret evaluate --query q.npy --gallery g.npy --labels labels.csv --json``.

It prints the wall-time ratio (b)/(a) and each process's peak RSS (from
``os.wait4`` in a small launcher), then, in this process, the old method (stable argsort of each
full row, ``full_ranking``) against the new one on a small query subset, and
the peak RSS of only reading the labels CSV and the gallery manifest.

``--device cuda`` runs clipret evaluate with ``CLIPRET_SEARCH_DEVICE=cuda`` (score blocks as
torch matmuls on the GPU), and the floor becomes (t) a bare torch matmul of the same arrays on the
same GPU (the gallery copied there once, the same query chunks, full float32, one scalar read back
per chunk), and (s) splits clipret's own time on the device (in one process, the gallery already
there): the score blocks alone, then the score blocks with their ranks counted on the device
(:mod:`clipret.evaluation.device_ranks`); ``--torch-floor`` adds (t) and (s) on the CPU device too. The default, ``--device cpu``, is
the CPU comparison as before (clipret evaluate pinned to the CPU path).

    flock /tmp/clipret-bench.lock python bench/evaluate.py            # 20k x 1M x 256
    flock /tmp/clipret-bench.lock python bench/evaluate.py --quick    # 2k x 100k x 256
    python bench/evaluate.py --device cuda --old-subset 0             # on a GPU machine: 20k x 1M x 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOOR = r"""
import sys, numpy as np
q = np.load(sys.argv[1], mmap_mode="r"); g = np.load(sys.argv[2], mmap_mode="r"); rows = int(sys.argv[3])
out = np.empty((rows, g.shape[0]), np.float32); total = 0.0
for q0 in range(0, q.shape[0], rows):
    block = np.ascontiguousarray(q[q0:q0 + rows])
    s = np.matmul(block, g.T, out=out[: len(block)])
    total += float(s[:, 0].sum())
print(total)
"""

TORCH_FLOOR = r"""
import json, sys, time, numpy as np, torch
t0 = time.perf_counter()
q = np.load(sys.argv[1], mmap_mode="r"); g = np.load(sys.argv[2], mmap_mode="r"); rows = int(sys.argv[3]); dev = sys.argv[4]
torch.set_float32_matmul_precision("highest")
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
gd = torch.empty(g.shape, dtype=torch.float32, device=dev)
for g0 in range(0, g.shape[0], 65536):
    gd[g0:g0 + 65536] = torch.from_numpy(np.ascontiguousarray(g[g0:g0 + 65536])).to(dev)
sync(); t1 = time.perf_counter(); total = 0.0
with torch.inference_mode():
    for q0 in range(0, q.shape[0], rows):
        s = torch.from_numpy(np.ascontiguousarray(q[q0:q0 + rows])).to(dev) @ gd.T
        total += float(s[:, 0].sum())
sync()
print(json.dumps({"total": total, "upload_s": t1 - t0, "matmul_s": time.perf_counter() - t1}))
"""

SPLIT = r"""
import json, sys, time, torch
from clipret.artifacts import load_embeddings
from clipret.data.layout import read_labels_csv
from clipret.evaluation import label_codes
from clipret.evaluation import device_ranks
from clipret.evaluation.device_ranks import DeviceMembers, block_ranks
from clipret.retrieval.scores import device_matmul_scores
labels, q, g = read_labels_csv(sys.argv[1]), load_embeddings(sys.argv[2]), load_embeddings(sys.argv[3])
rows, dev = int(sys.argv[4]), sys.argv[5]
qc, gc = label_codes(q.ids, g.ids, labels)
score, members = device_matmul_scores(q.vectors, g.vectors, rows, dev, to_host=False), DeviceMembers(gc, dev)
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
score(0, min(rows, len(qc))); sync()  # the gallery goes to the device once, outside both timings
def timed(count):
    t = time.perf_counter()
    for q0 in range(0, len(qc), rows):
        block = score(q0, min(q0 + rows, len(qc)))
        if count:
            block_ranks(block, qc[q0:q0 + rows], members)
    sync()
    return time.perf_counter() - t
split = {"scores_s": timed(False), "scores_and_ranks_s": timed(True)}
device_ranks.HOT_BIN_SPREAD = 4096  # the same counts, the below-everything bins spread (left off by default)
split["scores_and_ranks_spread_s"] = timed(True)
print(json.dumps(split))
"""

PARSE = r"""
import sys
from clipret.artifacts import load_embeddings
from clipret.data.layout import read_labels_csv
from clipret.evaluation import label_codes
labels = read_labels_csv(sys.argv[1])
q, g = load_embeddings(sys.argv[2], check_finite=False), load_embeddings(sys.argv[3], check_finite=False)
label_codes(q.ids, g.ids, labels)
"""


def make_data(root: Path, n_query: int, n_gallery: int, dim: int, classes: int, noise: float, seed: int = 0) -> None:
    """Write q.npy, g.npy (+ manifests) and labels.csv, unless they exist with these sizes."""
    from clipret.artifacts.atomic import write_json
    from clipret.artifacts.embeddings import EMBEDDINGS_FORMAT

    stamp = root / "params.json"
    params = {"q": n_query, "g": n_gallery, "d": dim, "classes": classes, "noise": noise, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    with open(root / "labels.csv", "w", encoding="utf-8") as labels_csv:
        labels_csv.write("filename,label\n")
        for name, n in (("q", n_query), ("g", n_gallery)):
            arr = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
            ids = [f"{name}/{i:07d}.jpg" for i in range(n)]
            for start in range(0, n, 65536):
                stop = min(n, start + 65536)
                lab = rng.integers(0, classes, stop - start)
                x = centers[lab] + (noise / np.sqrt(dim)) * rng.standard_normal((stop - start, dim), dtype=np.float32)
                arr[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
                labels_csv.writelines(f"{ids[start + i]},c{c}\n" for i, c in enumerate(lab.tolist()))
            arr.flush()
            del arr
            write_json(root / f"{name}.json", {
                "format": EMBEDDINGS_FORMAT, "count": n, "dim": dim, "dtype": "float32", "normalized": True,
                "model_fingerprint": "bench", "flags": {}, "ids": ids, "skipped": [],
            })
    stamp.write_text(json.dumps(params))


# A tiny launcher: a child forked from a big process reports the parent's RSS as its own peak
# (ru_maxrss counts the pages shared before exec), so each measured command is started from a
# fresh, small interpreter, which reaps it with os.wait4 and writes its wall time and peak RSS.
LAUNCH = r"""
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` (with ``env`` added to the environment); return (wall seconds, peak RSS in MiB of
    that process alone, stdout)."""
    with tempfile.TemporaryDirectory() as tmp:
        report, err_path = Path(tmp) / "report", Path(tmp) / "stderr"
        with open(err_path, "wb") as err:  # a file, not a pipe: a chatty stderr cannot block the child
            done = subprocess.run([sys.executable, "-c", LAUNCH, str(report), *cmd], stdout=subprocess.PIPE, stderr=err,
                                  env={**os.environ, **(env or {})})
        wall, rss_kib, code = report.read_text().split()
        if int(code) != 0 or done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}):\n{err_path.read_text()[-3000:]}")
    return float(wall), int(rss_kib) / 1024, done.stdout.decode()


def old_vs_new(root: Path, n: int) -> None:
    """The old path (stable argsort of whole rows) against the new one on the first ``n`` queries."""
    from clipret import metrics
    from clipret.artifacts import load_embeddings
    from clipret.data.layout import read_labels_csv
    from clipret.evaluation import chunk_rows, evaluate_scores, label_codes, score_chunks
    from clipret.retrieval.scores import matmul_scores
    from clipret.retrieval.ranking import full_ranking

    q, g = load_embeddings(root / "q.npy", check_finite=False), load_embeddings(root / "g.npy", check_finite=False)
    qc, gc = label_codes(q.ids[:n], g.ids, read_labels_csv(root / "labels.csv"))
    sub = np.ascontiguousarray(q.vectors[:n])
    t0 = time.perf_counter()
    old = metrics.evaluate_full(qc, gc, full_ranking(sub, g.vectors, chunk=16), [1, 5, 10])
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = chunk_rows(len(g))
    new = evaluate_scores(score_chunks(matmul_scores(sub, g.vectors, rows), qc, rows), gc, [1, 5, 10])
    t_new = time.perf_counter() - t0
    diff = max(abs(old[k] - new[k]) for k in old)
    print(f"old method (argsort per row) on {n} queries: {t_old:.1f} s; new: {t_new:.1f} s; "
          f"speedup {t_old / t_new:.1f}x; max metric difference {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 x 100,000 instead of 20,000 x 1,000,000")
    ap.add_argument("--queries", type=int)
    ap.add_argument("--gallery", type=int)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, help="default: one class per 1,000 gallery items")
    ap.add_argument("--noise", type=float, default=2.0, help="per-item noise norm (relative to the unit class centre)")
    ap.add_argument("--old-subset", type=int, default=32, help="queries for the old-vs-new comparison (0: skip)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clipret-bench/evaluate"))
    ap.add_argument("--device", default="cpu", help="cpu (numpy floor, CPU path) or cuda (torch floor, GPU path)")
    ap.add_argument("--torch-floor", action="store_true", help="also (t), the bare torch matmul, on --device cpu")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    n_q = args.queries or (2_000 if args.quick else 20_000)
    n_g = args.gallery or (100_000 if args.quick else 1_000_000)
    classes = args.classes or max(2, n_g // 1000)
    root = args.cache / f"{n_q}x{n_g}x{args.dim}"
    t0 = time.perf_counter()
    make_data(root, n_q, n_g, args.dim, classes, args.noise)
    print(f"data: {n_q} queries x {n_g} gallery x D={args.dim}, {classes} classes, noise {args.noise} "
          f"({root}; ready in {time.perf_counter() - t0:.0f} s)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          "(a shared machine inflates both timings)")

    from clipret.evaluation import chunk_rows

    rows = chunk_rows(n_g)
    q, g, labels = root / "q.npy", root / "g.npy", root / "labels.csv"
    for path in (q, g):  # warm the page cache so neither run pays for the first read
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    gpu = args.device.startswith("cuda")
    report: dict = {"queries": n_q, "gallery": n_g, "dim": args.dim, "classes": classes, "rows": rows, "device": args.device}
    if not gpu:
        floor_s, floor_rss, _ = run_measured([sys.executable, "-c", FLOOR, str(q), str(g), str(rows)])
        report.update(floor_s=floor_s, floor_rss_mib=floor_rss)
        print(f"(a) floor, bare chunked matmul ({rows} queries a chunk): {floor_s:7.1f} s, peak RSS {floor_rss:7.0f} MiB")
    if gpu or args.torch_floor:
        torch_s, torch_rss, out = run_measured([sys.executable, "-c", TORCH_FLOOR, str(q), str(g), str(rows), args.device])
        inner = json.loads(out)
        report.update(torch_floor_s=torch_s, torch_floor_rss_mib=torch_rss, torch_floor=inner)
        print(f"(t) floor, bare torch matmul on {args.device} ({rows} queries a chunk): {torch_s:7.1f} s whole process "
              f"(gallery upload {inner['upload_s']:.2f} s, matmuls {inner['matmul_s']:.2f} s), peak RSS {torch_rss:7.0f} MiB")
        _, _, out = run_measured([sys.executable, "-c", SPLIT, str(labels), str(q), str(g), str(rows), args.device])
        split = report["device_split"] = json.loads(out)
        print(f"(s) inside clipret on {args.device}, gallery already there: score blocks alone {split['scores_s']:.2f} s; "
              f"with the ranks counted on the device (evaluation/device_ranks.py) {split['scores_and_ranks_s']:.2f} s; "
              f"the same with HOT_BIN_SPREAD 4096 {split['scores_and_ranks_spread_s']:.2f} s")
    ours_s, ours_rss, out = run_measured([sys.executable, "-m", "clipret", "evaluate", "--query", str(q),
                                          "--gallery", str(g), "--labels", str(labels), "--json"],
                                         env={"CLIPRET_SEARCH_DEVICE": "cuda" if gpu else "cpu"})
    result = json.loads(out)
    report.update(clipret_s=ours_s, clipret_rss_mib=ours_rss, metrics={k: result[k] for k in ("map", "map@r", "recall@1")})
    print(f"(b) clipret evaluate on {args.device} (whole process):      {ours_s:7.1f} s, peak RSS {ours_rss:7.0f} MiB")
    ratios = [(name, ours_s / report[key]) for name, key in (("a", "floor_s"), ("t", "torch_floor_s")) if key in report]
    print("   ".join(f"ratio (b)/({name}): {value:.2f}" for name, value in ratios) + "   "
          f"map {result['map']:.4f}  map@r {result['map@r']:.4f}  recall@1 {result['recall@1']:.4f}")
    report["ratios"] = dict(ratios)
    _, parse_rss, _ = run_measured([sys.executable, "-c", PARSE, str(labels), str(q), str(g)])
    print(f"reading labels.csv + both manifests + label codes alone: peak RSS {parse_rss:.0f} MiB")
    if args.old_subset:
        old_vs_new(root, args.old_subset)
    if args.json:
        from clipret.artifacts import write_json

        write_json(args.json, report)


if __name__ == "__main__":
    main()
