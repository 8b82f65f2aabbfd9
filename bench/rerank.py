"""k-reciprocal re-ranking: the sparse exact implementation against the classic dense one.

Generates clustered unit vectors (seeded) and runs, on the same data, the
dense baseline from ``tests/reference.py`` ((Q+G)^2 float32 matrices and one
loop per item, the shape of the authors' public code) and
``clipret.retrieval.rerank.k_reciprocal_rerank``. Each runs in a fresh
subprocess, so its peak RSS (VmHWM) is its own; the time is the call
alone. Prints top-10 agreement (exactly tied distances may swap), the
time ratio and the peak-memory ratio.

    flock /tmp/clipret-bench.lock python bench/rerank.py                 # Q=1,000 G=10,000 D=128
    flock /tmp/clipret-bench.lock python bench/rerank.py --scale         # Q=10,000 G=200,000 D=256, ours only

Targets (issue 7): >= 99.5 % identical top-10, >= 20x faster, <= 1/8 of the peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def clustered(n_query: int, n_gallery: int, dim: int, seed: int, per: int = 10, noise: float = 0.6):
    """Unit float32 vectors around n_gallery / per Gaussian centres; queries come from the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n_gallery // per), dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        x = np.empty((n, dim), dtype=np.float32)
        for a in range(0, n, 65536):
            b = min(n, a + 65536)
            x[a:b] = centres[rng.integers(0, len(centres), b - a)] + noise * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw(n_query), draw(n_gallery)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's own peak RSS. ru_maxrss would include the parent's peak (it survives fork + exec)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def timed(fn, repeats: int):
    """(fastest wall seconds, CPU seconds of that run, result) over ``repeats`` runs of ``fn()``."""
    best = None
    for _ in range(repeats):
        t, cpu = time.perf_counter(), cpu_seconds()
        out = fn()
        run = (time.perf_counter() - t, cpu_seconds() - cpu)
        best = run if best is None or run[0] < best[0] else best
    return best[0], best[1], out


def worker(args: argparse.Namespace) -> None:
    """Run one implementation in this (fresh) process; print a JSON line of measurements."""
    query = np.load(Path(args.data) / "query.npy")
    gallery = np.load(Path(args.data) / "gallery.npy", mmap_mode="r" if args.worker != "dense" else None)
    report: dict[str, float] = {"rss_before_mb": rss_mb()}
    if args.worker == "dense":
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import dense_k_reciprocal_rerank

        report["seconds"], report["cpu_seconds"], final = timed(
            lambda: dense_k_reciprocal_rerank(query, gallery, args.k1, args.k2, args.lam), args.repeats)
        np.save(Path(args.data) / "dense_final.npy", final)
    else:
        from clipret.retrieval.rerank import build_gallery_graph, k_reciprocal_rerank

        def rerank(graph=None):
            return k_reciprocal_rerank(query, gallery, args.k, k1=args.k1, k2=args.k2, lam=args.lam, graph=graph)

        if args.worker == "ours-split":  # graph build and per-query work timed apart
            report["graph_seconds"], _, graph = timed(lambda: build_gallery_graph(gallery, k1=args.k1, k2=args.k2), 1)
            report["query_seconds"], _, (scores, idx) = timed(lambda: rerank(graph), args.repeats)
            report["seconds"] = report["graph_seconds"] + report["query_seconds"]
        else:
            report["seconds"], report["cpu_seconds"], (scores, idx) = timed(rerank, args.repeats)
        np.savez(Path(args.data) / f"{args.worker}.npz", scores=scores, idx=idx)
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report))


def run_worker(kind: str, data: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--k", str(args.k),
           "--k1", str(args.k1), "--k2", str(args.k2), "--lam", str(args.lam), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(final: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """(share of queries whose top-k has the reference's distances in order, share with identical indices)."""
    k = idx.shape[1]
    want = np.argsort(final, axis=1, kind="stable")[:, :k]  # the reference's own ranking rule
    same_dist = (np.take_along_axis(final, idx, 1) == np.take_along_axis(final, want, 1)).all(axis=1)
    return float(same_dist.mean()), float((idx == want).all(axis=1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", action="store_true", help="Q=10,000 G=200,000 D=256, ours only")
    p.add_argument("--queries", type=int)
    p.add_argument("--gallery", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, help="timed runs per implementation, the fastest counts (default 2; 1 with --scale)")
    p.add_argument("--worker", choices=["dense", "ours", "ours-split"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.scale else 2
    if args.worker:
        return worker(args)
    q = args.queries or (10_000 if args.scale else 1_000)
    g = args.gallery or (200_000 if args.scale else 10_000)
    d = args.dim or (256 if args.scale else 128)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        query, gallery = clustered(q, g, d, args.seed)
        np.save(data / "query.npy", query)
        np.save(data / "gallery.npy", gallery)
        del query, gallery
        print(f"clustered data: Q={q:,} G={g:,} D={d}, k1={args.k1} k2={args.k2} lambda={args.lam}, seed {args.seed}")
        if args.scale:
            ours = run_worker("ours-split", data, args)
            dense_gb = (q + g) ** 2 * 4 / 1e9
            print(f"ours: {ours['seconds']:.1f} s (gallery graph {ours['graph_seconds']:.1f} s, "
                  f"queries {ours['query_seconds']:.1f} s), peak RSS {ours['peak_rss_mb']:,.0f} MB "
                  f"(after loading the data: {ours['rss_before_mb']:,.0f} MB)")
            print(f"one dense (Q+G)^2 float32 matrix alone would take {dense_gb:,.0f} GB")
            return
        dense = run_worker("dense", data, args)
        ours = run_worker("ours", data, args)
        warm = run_worker("ours-split", data, args)
        final = np.load(data / "dense_final.npy")
        same, identical = agreement(final, np.load(data / "ours.npz")["idx"])
    print(f"dense baseline: {dense['seconds']:.2f} s (CPU {dense['cpu_seconds']:.2f} s), "
          f"peak RSS {dense['peak_rss_mb']:,.0f} MB")
    print(f"ours:           {ours['seconds']:.2f} s (CPU {ours['cpu_seconds']:.2f} s), "
          f"peak RSS {ours['peak_rss_mb']:,.0f} MB (gallery graph built in the call)")
    print(f"top-{args.k} identical to the dense baseline: {100 * same:.2f} % of queries "
          f"({100 * identical:.2f} % with identical indices)")
    print(f"speed: {dense['seconds'] / ours['seconds']:.1f}x faster "
          f"(CPU time: {dense['cpu_seconds'] / ours['cpu_seconds']:.1f}x); "
          f"with the gallery graph cached: {dense['seconds'] / warm['query_seconds']:.1f}x")
    print(f"memory: {ours['peak_rss_mb'] / dense['peak_rss_mb']:.3f} of the baseline's peak "
          f"(1/{dense['peak_rss_mb'] / ours['peak_rss_mb']:.1f}); both include the interpreter and the data, "
          f"{ours['rss_before_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
