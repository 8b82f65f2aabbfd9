"""What each retrieval post-processing stage does on real images (Fashion-MNIST), over seeds.

Per protocol and seed (see ``fmnist_protocol``): export, train the tiny ViT
once, embed query and gallery plain, with ``--tta flip`` and with
``--tta flip,scales``, then score the full ranking (R@1, MAP@R, mAP) of each
row: plain; +TTA; +DBA N; +QE N; +α-QE N, α; +rerank (default k1/k2/λ and a
grid); raw pixels for reference; and the best combination of the best
setting of each stage, chosen on the first seed only and reported on all.
Prints mean ± std over seeds, the paired delta against plain, marks rows
that do not help, and the cost of each row as a ratio to the plain one:
``search ×`` is what ``clipret query`` does for the stages (DBA, re-ranking
graph, QE, search, top 10), ``embed ×`` the forward passes of TTA.

Every finished row is appended to ``--out`` (JSON lines), so a re-run
resumes where it stopped; data, runs and embeddings are kept under ``--work``.

    flock /tmp/clipret-bench.lock python bench/postprocess.py                    # closed set, seeds 0 1
    flock /tmp/clipret-bench.lock python bench/postprocess.py --protocols closed open
    python bench/postprocess.py --quick --work /tmp/pp --out /tmp/pp.jsonl       # smoke run (~15 s idle)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fmnist_protocol as fp
from seed_table import METRICS, fmt_pm, markdown_table, summarize

from clipret.retrieval.pipeline import Stages

TTAS = (None, "flip", "flip,scales")
FAMILIES = ("tta", "dba", "qe", "rerank")  # one best setting of each may enter the combination
VERSION = 1  # bump to invalidate cached rows when the row computation changes


@dataclass(frozen=True)
class Row:
    """One table row: the embeddings' TTA and the post-processing stages; ``family`` groups a stage's settings."""

    name: str
    family: str
    tta: str | None = None
    stages: Stages = field(default_factory=Stages)

    def flags(self) -> str:
        """The CLI flags that reproduce the row (``embed`` for TTA, ``evaluate``/``query`` for the rest)."""
        out = [f"embed --tta {self.tta}"] if self.tta else []
        s, f = self.stages, []
        if s.dba:
            f.append(f"--dba {s.dba}")
        if s.qe:
            f.append(f"--qe {s.qe}" + (f" --qe-alpha {s.qe_alpha:g}" if s.qe_alpha is not None else ""))
        if s.rerank:
            f.append(f"--rerank --k1 {s.k1} --k2 {s.k2} --lambda {s.lam:g}")
        return "; ".join(out + ([" ".join(f)] if f else [])) or "(none)"

    def cli_args(self) -> list[str]:
        s, a = self.stages, []
        if s.dba:
            a += ["--dba", str(s.dba)]
        if s.qe:
            a += ["--qe", str(s.qe)] + (["--qe-alpha", repr(s.qe_alpha)] if s.qe_alpha is not None else [])
        if s.rerank:
            a += ["--rerank", "--k1", str(s.k1), "--k2", str(s.k2), "--lambda", repr(s.lam)]
        return a


def grid(quick: bool = False) -> list[Row]:
    """The rows measured on every seed (the combination is added later)."""
    rows = [Row("plain", "plain")]
    rows += [Row(f"+TTA {t}", "tta", tta=t) for t in TTAS[1:2 if quick else 3]]
    rows += [Row(f"+DBA {n}", "dba", stages=Stages(dba=n)) for n in ((1,) if quick else (1, 2, 3, 5))]
    rows += [Row(f"+QE {n}", "qe", stages=Stages(qe=n)) for n in ((2,) if quick else (1, 2, 3, 5))]
    rows += [Row(f"+α-QE {n}, α={a:g}", "qe", stages=Stages(qe=n, qe_alpha=float(a)))
             for n, a in (((5, 3),) if quick else itertools.product((5, 10), (1, 3)))]
    rows.append(Row("+rerank (default 20, 6, 0.3)", "rerank", stages=Stages(rerank=True)))
    if not quick:
        for k1, k2, lam in itertools.product((10, 20, 30), (3, 6), (0.1, 0.3, 0.5)):
            if (k1, k2, lam) != (20, 6, 0.3):
                rows.append(Row(f"+rerank k1={k1} k2={k2} λ={lam:g}", "rerank", stages=Stages(rerank=True, k1=k1, k2=k2, lam=lam)))
    return rows


def combine(parts: list[Row]) -> Row:
    """One row with the TTA and the stages of ``parts`` (each from another family)."""
    tta = next((p.tta for p in parts if p.tta), None)
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update({k: v for k, v in asdict(p.stages).items() if v != getattr(Stages(), k)})
    return Row(" + ".join(p.name.lstrip("+") for p in parts), "combo", tta=tta, stages=Stages(**merged))


def candidates(rows: list[Row], scores: dict[str, float]) -> list[list[Row]]:
    """Every combination of at least two families' best settings, among families whose best beats plain.

    ``scores[name]`` is the selection metric of each row on the selection seed.
    """
    best = []
    for family in FAMILIES:
        members = [r for r in rows if r.family == family and r.name in scores]
        if members:
            top = max(members, key=lambda r: scores[r.name])
            if scores[top.name] > scores["plain"]:
                best.append(top)
    return [list(c) for n in range(2, len(best) + 1) for c in itertools.combinations(best, n)]


def measure(prep: fp.Prepared, row: Row, cache: fp.ResultCache, emb: dict[Any, tuple[Path, Path]],
            min_seconds: float = 0.3) -> dict[str, Any]:
    """The row's metrics and cost on one prepared seed, from the cache or computed now.

    ``min_seconds``: the least total time spent timing the search (see :func:`fmnist_protocol.time_search`).
    """
    key = fp.settings_key({"v": VERSION, "run": prep.run.name, "tta": row.tta, "stages": asdict(row.stages)})
    hit = cache.get(key)
    if hit is not None:
        return hit
    q, g = emb[row.tta]
    rec = {"key": key, "kind": "row", "protocol": prep.protocol, "seed": prep.seed, "run": prep.run.name,
           "row": row.name, "family": row.family, "flags": row.flags(), "tta": row.tta, "stages": asdict(row.stages),
           **fp.evaluate(q, g, prep.labels, row.stages), "search_s": fp.time_search(q, g, row.stages, min_seconds=min_seconds)}
    print(f"  {prep.protocol} seed {prep.seed}  {row.name:34s} R@1 {rec['recall@1']:.3f}  MAP@R {rec['map@r']:.3f}  "
          f"mAP {rec['map']:.3f}", flush=True)
    return cache.put(rec)


def run_seed(args: argparse.Namespace, protocol: str, seed: int, cache: fp.ResultCache) -> tuple[fp.Prepared, dict]:
    """Export, train, embed (each once) for one seed; return the run and {tta: (query.npy, gallery.npy)}."""
    prep = fp.prepare(args.work, protocol, seed, args.sizes, args.train)
    emb, seconds = {}, {}
    for tta in TTAS[:2] if args.quick else TTAS:
        paths = [prep.run / "emb" / f"{split}-{tta or 'plain'}.npy" for split in ("query", "gallery")]
        seconds[tta] = sum(fp.embed(prep.run, prep.folder(s), p, tta) for s, p in zip(("query", "gallery"), paths))
        emb[tta] = tuple(paths)
    key = fp.settings_key({"v": VERSION, "run": prep.run.name, "kind": "run"})
    if cache.get(key) is None:
        cache.put({"key": key, "kind": "run", "protocol": protocol, "seed": seed, "run": prep.run.name,
                   "train_s": prep.train_seconds, "embed_s": {str(t): s for t, s in seconds.items()}, "train": prep.train})
    q, g = fp.raw_pixels(prep.root, prep.run.parent.parent / "pixels" / prep.root.name)
    emb["pixels"] = (q, g)
    return prep, emb


def pixel_row(prep: fp.Prepared, emb: dict, cache: fp.ResultCache) -> dict[str, Any]:
    key = fp.settings_key({"v": VERSION, "pixels": prep.root.name})
    if cache.get(key) is None:
        q, g = emb["pixels"]
        cache.put({"key": key, "kind": "pixels", "protocol": prep.protocol, "seed": prep.seed, "row": "raw pixels",
                   **fp.evaluate(q, g, prep.labels), "search_s": fp.time_search(q, g)})
    return cache.get(key)  # type: ignore[return-value]


def cli_check(prep: fp.Prepared, row: Row, emb: dict, api: dict[str, Any]) -> bool:
    """Score ``row`` with ``clipret evaluate`` in a subprocess; True when it equals the in-process row."""
    q, g = emb[row.tta]
    cmd = [sys.executable, "-m", "clipret", "evaluate", "--query", str(q), "--gallery", str(g),
           "--labels", str(prep.labels), "--k", "1", "--json", *row.cli_args()]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        print(f"CLI cross-check failed to run ({shlex.join(cmd)}):\n{r.stderr}")
        return False
    m = json.loads(r.stdout)
    same = all(abs(m[k] - api[k]) <= 1e-9 for k in METRICS)
    print(f"CLI cross-check ({row.name}, {prep.protocol} seed {prep.seed}): clipret evaluate "
          + ("gives the same R@1, MAP@R and mAP" if same else f"DIFFERS: {m} vs {api}"))
    print(f"  {shlex.join(cmd)}")
    return same


def report(protocol: str, rows: list[Row], recs: dict[str, dict[int, dict]], runs: list[dict], args: argparse.Namespace,
           combo: Row | None, example: tuple[fp.Prepared, dict]) -> None:
    """Print the table for one protocol, how it was made, and how to reproduce a row by hand."""
    table = summarize(recs, "plain", (*METRICS, "search_s"))
    plain_cost = {s: r["search_s"] for s, r in recs["plain"].items()}
    embed = {r["seed"]: r["embed_s"] for r in runs}
    out = []
    for name in ["raw pixels", *[r.name for r in rows]]:
        if name not in table:
            continue
        t, row = table[name], next((r for r in rows if r.name == name), None)
        cost = [recs[name][s]["search_s"] / plain_cost[s] for s in recs[name] if s in plain_cost]
        tta = row.tta if row else None
        e = [embed[s][str(tta)] / embed[s]["None"] for s in recs[name] if s in embed and str(tta) in embed[s]]
        d = t["delta"][args.select][0]
        note = "" if name == "plain" else ("reference" if name == "raw pixels" else "no gain" if d <= 0 else
               "within noise" if abs(d) <= t["delta"][args.select][1] else "")
        out.append([name + (" ★" if combo and name == combo.name else ""), row.flags() if row else "raw pixels, cosine",
                    *[fmt_pm(t[k]) for k in METRICS], *[fmt_pm(t["delta"][k], signed=True) for k in METRICS],
                    f"{sum(cost) / len(cost):.2f}" if cost else "n/a", f"{sum(e) / len(e):.2f}" if e else "1.00", note])
    train_s = [r["train_s"] for r in runs]
    print(f"\n## {protocol} set: seeds {args.seeds}, {args.sizes}, training {sum(train_s) / len(train_s):.1f} s per run "
          f"(mean of {len(train_s)})")
    print(markdown_table(["row", "flags", "R@1", "MAP@R", "mAP", "ΔR@1", "ΔMAP@R", "ΔmAP", "search ×", "embed ×", "note"], out))
    if combo is not None:
        print(f"\n★ best combination, chosen on seed {args.seeds[0]} only by {args.select}, reported on all seeds: {combo.flags()}")
    else:
        print(f"\nno combination: fewer than two stages beat plain on seed {args.seeds[0]} by {args.select}")
    print(f"mean ± std over seeds (sample std); Δ: paired per seed against plain; 'no gain': mean Δ{args.select} ≤ 0; "
          f"'within noise': |mean Δ| ≤ its std. search ×: wall time of DBA + re-ranking graph + QE + search (top 10) "
          f"over the plain search; embed ×: embedding time over the plain embedding. {_machine()}")
    prep, _ = example
    print(f"reproduce the table: python bench/postprocess.py {shlex.join(args.argv)}")
    print(f"reproduce a row by hand (seed {prep.seed}): clipret embed {prep.folder('query')} --model {prep.run} --out q.npy "
          f"[--tta T], the same for {prep.folder('gallery')} into g.npy, then clipret evaluate --query q.npy "
          f"--gallery g.npy --labels {prep.labels} [FLAGS]")


def _machine() -> str:
    import os

    import torch

    return f"CPU: {os.cpu_count()} cores, torch {torch.get_num_threads()} threads."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = fp.ResultCache(args.out)
    args.argv = sys.argv[1:] if argv is None else argv
    print(f"reproduce: python bench/postprocess.py {shlex.join(args.argv)}   (from the repository root)", flush=True)
    ok = True
    for protocol in args.protocols:
        rows = grid(args.quick)
        recs: dict[str, dict[int, dict]] = {}
        runs, preps = [], {}
        for seed in args.seeds:
            prep, emb = preps[seed] = run_seed(args, protocol, seed, cache)
            recs.setdefault("raw pixels", {})[seed] = pixel_row(prep, emb, cache)
            for row in rows:
                recs.setdefault(row.name, {})[seed] = measure(prep, row, cache, emb, args.min_time)
            runs.append(next(r for r in cache if r.get("kind") == "run" and r["run"] == prep.run.name))
        first = args.seeds[0]  # chooses the combination
        scores = {n: by[first][args.select] for n, by in recs.items() if first in by}
        combo, best = None, -1.0
        for parts in candidates(rows, scores):
            row = combine(parts)
            rec = measure(preps[first][0], row, cache, preps[first][1], args.min_time)
            if rec[args.select] > best:
                combo, best = row, rec[args.select]
        if combo is not None:
            rows.append(combo)
            for seed in args.seeds:
                prep, emb = preps[seed]
                recs.setdefault(combo.name, {})[seed] = measure(prep, combo, cache, emb, args.min_time)
        report(protocol, rows, recs, runs, args, combo, preps[first])
        if args.cli_check:
            check = combo or next(r for r in rows if r.family == "rerank")
            ok &= cli_check(preps[first][0], check, preps[first][1], recs[check.name][first])
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data subset and training seeds (the first one chooses the combination)")
    ap.add_argument("--protocols", nargs="+", choices=sorted(fp.PROTOCOLS), default=["closed"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-postprocess/results.jsonl"), help="resumable JSON-lines results")
    fp.add_data_arguments(ap, train_per_class=500)
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other TrainConfig setting, e.g. aug_crop=false (values read as JSON, else text)")
    ap.add_argument("--select", choices=METRICS, default="map@r", help="metric that chooses the best combination")
    ap.add_argument("--no-cli-check", dest="cli_check", action="store_false", help="skip the clipret evaluate cross-check")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: few images, 1 epoch, a reduced grid")
    args = ap.parse_args(argv)
    args.min_time = 0.3
    if args.quick:
        args.train_per_class, args.query_per_class, args.gallery_per_class, args.epochs, args.k = 20, 5, 12, 1, 4
        args.min_time = 0.02
    args.sizes = fp.Sizes(args.train_per_class, args.query_per_class, args.gallery_per_class)
    args.train = {"epochs": args.epochs, "lr": args.lr, "p": args.p, "k": args.k, **dict(_setting(s) for s in args.train_set)}
    args.work = args.work or args.out.parent / (args.out.stem + ".work")
    return args


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--train-set takes KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


if __name__ == "__main__":
    sys.exit(main())
