"""Exact search and the FAISS index types on clustered vectors, side by side.

For each gallery size it writes seeded clustered unit vectors (D=256; see
``make_clusters``) and 1,000 queries from the same clusters, then prints for
exact search and each index type:

* build time and index memory (the index file's size, about its RAM) next to
  ``index_choice``'s estimate;
* queries per second (1,000 queries, k=10, default search parameters);
* recall@10 against exact search;
* the whole-process ratio: ``clipret query q.npy --gallery X --k 10`` over a
  bare script that loads the same files with numpy/faiss, searches and writes
  the same results.json (both run as subprocesses, imports included, median
  of ``--repeats`` interleaved runs). For an index the bare script reads it
  with ``faiss.read_index``. Until ``clipret query`` accepts ``.faiss``
  galleries that column reads ``n/a``.

    flock /tmp/clipret-bench.lock python bench/search.py --sizes 100000 1000000 --sweep --pq-m 16 32 64 128
    flock /tmp/clipret-bench.lock python bench/search.py --sizes 200000 --types flat   # the issue's exact-search check

The table and the guidance ``clipret index --type auto`` follows are in docs/benchmarks.md;
the recall column feeds ``EXPECTED_RECALL`` in clipret/retrieval/index/choice.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipret.artifacts import write_json
from clipret.artifacts.embeddings import EMBEDDINGS_FORMAT
from clipret.retrieval.index import choice as index_choice
from clipret.retrieval.index import FaissExactSearcher, open_index
from clipret.retrieval.index.build import build_index

BARE = r'''
import json, sys
import numpy as np
import faiss
q_path, g_path, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
q = np.load(q_path)
q_ids = json.load(open(q_path[:-4] + ".json"))["ids"]
if g_path.endswith(".npy"):
    index = faiss.IndexFlatIP(q.shape[1])
    index.add(np.load(g_path))
    g_ids = json.load(open(g_path[:-4] + ".json"))["ids"]
else:
    index = faiss.read_index(g_path)
    side = json.load(open(g_path + ".json"))
    g_ids, params = side["ids"], side["params"]
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]
scores, idx = index.search(q, k)
records = [{"filename": qid, "samples": [g_ids[j] for j in row], "scores": [round(float(s), 6) for s in srow]}
           for qid, row, srow in zip(q_ids, idx, scores)]
with open(out, "w", encoding="utf-8") as fh:
    json.dump(records, fh, indent=2, ensure_ascii=False)
'''


SWEEP = {"hnsw": {"ef_search": [32, 64, 128, 256, 512]}, "ivf": {"nprobe": [8, 16, 32, 64, 128, 256, 512]},
         "ivfpq": {"nprobe": [16, 64, 256]}}


def make_clusters(dim: int, seed: int, n_clusters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (C, D) unit rows, spread (C,), weights (C,)) of a two-level mixture, from ``seed``.

    About 33 clusters share each random "super" centre; a cluster centre is its
    super centre plus isotropic noise of norm 0.7 (neighbouring clusters overlap,
    as classes of one kind do). A point is its cluster centre plus isotropic noise
    of norm ``spread``, drawn per cluster from U(1, 2), then normalised: the
    exact top-1 cosine is about 0.45, the 10th 0.41. Cluster sizes are uneven
    (Dirichlet(2) weights). Hard enough that IVF needs to probe more than a few
    cells: on well-separated blobs every index type reaches recall 1.
    """
    rng = np.random.default_rng(seed)
    supers = rng.standard_normal((max(1, n_clusters // 33), dim)).astype(np.float32)
    supers /= np.linalg.norm(supers, axis=1, keepdims=True)
    parent = rng.integers(0, len(supers), n_clusters)
    centres = supers[parent] + 0.7 * rng.standard_normal((n_clusters, dim)).astype(np.float32) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres, rng.uniform(1.0, 2.0, n_clusters).astype(np.float32), rng.dirichlet(np.full(n_clusters, 2.0))


def make_clustered(n: int, clusters: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int, prefix: str,
                   chunk: int = 65536):
    """Yield (rows (m, D) float32 unit, ids) blocks of ``n`` points drawn from ``clusters``."""
    centres, spread, weights = clusters
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.choice(len(centres), size=m, p=weights)
        x = centres[c] + rng.standard_normal((m, centres.shape[1]), dtype=np.float32) * (spread[c, None] / np.sqrt(centres.shape[1]))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x.astype(np.float32), [f"c{ci}/{prefix}{start + i}" for i, ci in enumerate(c)]


def write_embeddings(path: Path, n: int, clusters: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int, prefix: str) -> None:
    dim = clusters[0].shape[1]
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    ids: list[str] = []
    for rows, block_ids in make_clustered(n, clusters, seed, prefix):
        arr[len(ids) : len(ids) + len(rows)] = rows
        ids += block_ids
    arr.flush()
    del arr
    write_json(path.with_suffix(".json"), {"format": EMBEDDINGS_FORMAT, "count": n, "dim": dim, "dtype": "float32",
                                           "normalized": True, "model_fingerprint": "bench", "flags": {}, "ids": ids,
                                           "skipped": []})


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, truth)]))


def process_ratio(work: Path, gallery: Path, repeats: int) -> str:
    """Median wall time of `clipret query` over the bare script, interleaved runs."""
    bare = work / "bare.py"
    bare.write_text(BARE)
    q = str(work / "q.npy")
    cmds = {"clipret": [sys.executable, "-m", "clipret", "query", q, "--gallery", str(gallery), "--k", "10", "--out", str(work / "r1.json")],
            "bare": [sys.executable, str(bare), q, str(gallery), str(work / "r2.json"), "10"]}
    times: dict[str, list[float]] = {"clipret": [], "bare": []}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            t = time.perf_counter()
            r = subprocess.run(cmd, check=False, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t)
            if r.returncode != 0:
                return "n/a" if name == "clipret" else f"bare failed: {r.stderr.strip().splitlines()[-1]}"
    c, b = statistics.median(times["clipret"]), statistics.median(times["bare"])
    return f"{c / b:.2f} ({c:.1f}s/{b:.1f}s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivf", "ivfpq"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="whole-process runs per side")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated files here (default: a temp folder)")
    ap.add_argument("--pq-m", type=int, nargs="+", default=None, help="ivfpq sub-quantizer counts to try (default: dim/4)")
    ap.add_argument("--sweep", action="store_true", help="also search each index at other nprobe / ef_search values")
    ap.add_argument("--set", action="append", default=[], metavar="TYPE:KEY=VALUE",
                    help="non-default build parameter, e.g. hnsw:ef_search=64 (repeatable)")
    args = ap.parse_args()
    overrides: dict[str, dict[str, int]] = {}
    for item in args.set:
        kind, kv = item.split(":")
        key, value = kv.split("=")
        overrides.setdefault(kind, {})[key] = int(value)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="clipret-bench-search-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"clustered unit vectors, D={args.dim}, {args.queries} queries, k=10, faiss threads={os.cpu_count()}, files in {root}")
    header = f"{'N':>9} {'type':<6} {'params':<40} {'build s':>8} {'MB':>8} {'est MB':>8} {'q/s':>9} {'R@10':>6}  process ratio"
    print(header)
    for n in args.sizes:
        work = root / f"n{n}"
        work.mkdir(exist_ok=True)
        g_path, q_path = work / "g.npy", work / "q.npy"
        if not g_path.exists():
            clusters = make_clusters(args.dim, args.seed, max(10, n // 100))
            write_embeddings(g_path, n, clusters, args.seed + 1, "g")
            write_embeddings(q_path, args.queries, clusters, args.seed + 2, "q")
        gallery = np.load(g_path, mmap_mode="r")
        queries = np.load(q_path)
        t = time.perf_counter()
        _, truth = FaissExactSearcher(gallery).search(queries, 10)
        exact_qps = len(queries) / (time.perf_counter() - t)
        print(f"{n:>9} {'exact':<6} {'faiss.knn over the .npy':<40} {'-':>8} {gallery.nbytes / 1e6:>8.0f} {'-':>8} "
              f"{exact_qps:>9.0f} {1.0:>6.3f}  {process_ratio(work, g_path, args.repeats)}", flush=True)
        runs = [(k, {}) for k in args.types if k != "ivfpq"]
        runs += [("ivfpq", {"m": m} if m else {}) for m in (args.pq_m or [None]) if "ivfpq" in args.types]
        for kind, variant in runs:
            out = work / f"{kind}{variant.get('m', '')}.faiss"
            t = time.perf_counter()
            meta = build_index([g_path], out, kind=kind, params={**overrides.get(kind, {}), **variant}, seed=args.seed)
            build_s = time.perf_counter() - t
            est = index_choice.estimate_memory(kind, n, args.dim, meta["params"])
            gal = open_index(out)
            gal.searcher.search(queries[:10], 10)  # warm up
            t = time.perf_counter()
            _, found = gal.searcher.search(queries, 10)
            qps = len(queries) / (time.perf_counter() - t)
            params = ", ".join(f"{k}={v}" for k, v in meta["params"].items() if k != "seed")
            print(f"{n:>9} {kind:<6} {params:<40} {build_s:>8.1f} {meta['faiss_bytes'] / 1e6:>8.0f} {est / 1e6:>8.0f} "
                  f"{qps:>9.0f} {recall_at(found, truth):>6.3f}  {process_ratio(work, out, args.repeats)}", flush=True)
            del gal
            for key, values in SWEEP.get(kind, {}).items() if args.sweep else ():
                for v in values:
                    gal = open_index(out, **{key: v})
                    t = time.perf_counter()
                    _, found = gal.searcher.search(queries, 10)
                    qps = len(queries) / (time.perf_counter() - t)
                    print(f"{'':>9} {'':<6} {'  search with ' + key + '=' + str(v):<40} {'':>8} {'':>8} {'':>8} "
                          f"{qps:>9.0f} {recall_at(found, truth):>6.3f}", flush=True)


if __name__ == "__main__":
    main()
