"""Does each piece of clipret's training recipe earn its keep? An ablation on real images (Fashion-MNIST).

Per protocol (``fmnist_protocol``: *closed* trains on the 10 classes' training images and
retrieves held-out test images of the same classes; *open* trains on classes 0-5 and retrieves
among 6-9) and seed, every row is scored in the same run against three references:

- **raw pixels** (cosine on the flattened, normalised image);
- **untrained network** (the same tiny ViT and head at random init, never trained);
- **trained (default)**: clipret's default recipe, given only ``--epochs``, ``--lr``, ``--p``, ``--k``.

Then one change at a time against the default (augmentation, pooling, head, miner, warmup,
LR layout, loss, flip TTA). Ablation rows run on ``--seeds``; the references and the default
on ``--final-seeds``. Each row: R@1, MAP@R, mAP (mean ± sample std over seeds), ΔMAP@R paired
per seed against the default, and the training wall time.

**Fine-tuning proxy** (``--finetune``, on by default): the *open* protocol's default run, trained
on classes 0-5, is the "pretrained backbone". Fine-tune it (``--pretrained RUN``) on classes
6-9 with the default recipe, and compare on 6-9's held-out query/gallery images with the
pretrained model's own embedding before fine-tuning (what a user has before ``clipret
train``), and with a random-init run of the same budget. Every epoch's validation MAP@R of the
fine-tune is checked against its epoch-0 row (the starting weights on the same held-out images).

Everything is cached under ``--work`` and every finished row is appended to ``--out``, so a
killed run resumes where it stopped (a half-trained run resumes from its checkpoint).

    flock /tmp/clipret-bench.lock python bench/recipe.py                       # everything (hours on 2 cores)
    python bench/recipe.py --rows default                                      # references and the default only
    python bench/recipe.py --protocols closed --rows aug lr --seeds 0 1        # some ablation rows
    python bench/recipe.py --quick --work /tmp/rq --out /tmp/rq.jsonl          # smoke run (~1 min)
    python bench/recipe.py --rows default --model bench/configs/fmnist-rn.json  # another network (open_clip config)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fmnist_protocol as fp
from seed_table import METRICS, fmt_pm, markdown_table, summarize

VERSION = 1  # bump to invalidate cached rows when the row computation changes
DEFAULT = "trained (default)"


@dataclass(frozen=True)
class Row:
    """One ablation row: TrainConfig overrides on top of the default recipe, and the embedding's TTA."""

    name: str
    family: str
    train: dict[str, Any] = field(default_factory=dict)
    tta: str | None = None

    def flags(self) -> str:
        out = [f"--{k.replace('_', '-')} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.train.items()]
        return " ".join(out + ([f"embed --tta {self.tta}"] if self.tta else [])) or "(defaults)"


NEVER = 10**6  # a miner start epoch no run reaches: the miner stays off

ROWS: tuple[Row, ...] = (
    Row(DEFAULT, "default"),
    Row("aug: off", "aug", {"aug_crop": False, "aug_flip": False, "aug_color_jitter": 0.0, "aug_grayscale": 0.0,
                            "aug_erasing": 0.0}),
    Row("aug: mild crop (area 0.8-1)", "aug", {"aug_crop": True, "aug_crop_scale": 0.8}),
    Row("aug: seed's strong", "aug", {"aug_crop": True, "aug_crop_scale": 0.5, "aug_color_jitter": 0.2,
                                      "aug_grayscale": 0.1, "aug_erasing": 0.25}),
    Row("pool: GeM softplus", "pool", {"gem_input": "softplus"}),
    Row("pool: CLS", "pool", {"pool": "cls"}),
    Row("pool: mean", "pool", {"pool": "mean"}),
    Row("head: no BatchNorm", "head", {"head_bn": False}),
    Row("head: no dropout", "head", {"dropout": 0.0}),
    Row("miner: off", "miner", {"mine_from_epoch": NEVER}),
    Row("miner: from epoch 1", "miner", {"mine_from_epoch": 1}),
    Row("warmup: 0", "warmup", {"warmup": 0.0}),
    Row("warmup: 0.3", "warmup", {"warmup": 0.3}),
    Row("head LR ×1", "lr", {"head_lr_mult": 1.0}),
    Row("head LR ×3", "lr", {"head_lr_mult": 3.0}),
    Row("LLRD 0.65", "lr", {"llrd": 0.65}),
    Row("Circle m 0.25, γ 256", "loss", {"circle_m": 0.25, "circle_gamma": 256.0}),
    Row("Circle γ 80 (the seed's)", "loss", {"circle_gamma": 80.0}),
    Row("Circle m 0.25", "loss", {"circle_m": 0.25}),
    Row("loss: MultiSimilarity", "loss", {"loss": "multisimilarity"}),
    Row("loss: ArcFace", "loss", {"loss": "arcface"}),
    Row("+ flip TTA", "tta", tta="flip"),
)


def untrained(prep: fp.Prepared, args: argparse.Namespace) -> Path:
    """The default run's network at random init (seeded), saved as a model folder once."""
    import torch

    from clipret.model.build import create_encoder, save_model
    from clipret.training.setup import probe_spec

    model = args.train.get("model")
    suffix = f"-{fp.settings_key({'model': json.loads(Path(model).read_text())})}" if model else ""
    folder = prep.run.parent.parent / "untrained" / f"{prep.protocol}-s{prep.seed}{suffix}"
    if not (folder / "model.safetensors").is_file():
        cfg = fp.train_config(prep.root, folder, prep.seed, **fp.protocol_overrides(prep.protocol, args.train))
        torch.manual_seed(prep.seed)
        save_model(folder, create_encoder(probe_spec(cfg)).eval(), probe_spec(cfg))
    return folder


def effective(row: Row, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a row's run computes on the benchmark's inputs (32 px, gray, random init): its TrainConfig
    with the size- and image-dependent defaults resolved (augmentation, layer-wise decay), and its TTA."""
    from dataclasses import asdict

    from clipret.data.transforms import resolve_augmentation

    cfg = fp.train_config("unused", "unused", 0, **{**(train or {}), **row.train})
    aug = resolve_augmentation(32, True, crop=cfg.aug_crop, flip=cfg.aug_flip, color_jitter=cfg.aug_color_jitter,
                               grayscale=cfg.aug_grayscale, erasing=cfg.aug_erasing, crop_scale=cfg.aug_crop_scale)
    out = {k: v for k, v in fp.run_key(cfg).items() if not k.startswith("aug_") and k != "llrd"}
    return {**out, "aug": asdict(aug), "llrd": cfg.resolved_llrd("none"), "tta": row.tta}


def score_key(model: Path, prep: fp.Prepared, tta: str | None) -> str:
    """The cache key of ``model``'s scores on ``prep``'s query and gallery (with ``tta``)."""
    return fp.settings_key({"v": VERSION, "model": str(model), "data": prep.root.name, "tta": tta})


def score(model: Path, prep: fp.Prepared, tta: str | None, cache: fp.ResultCache, meta: dict[str, Any]) -> dict[str, Any]:
    """Embed ``prep``'s query and gallery with ``model`` (once) and score them, through the cache."""
    key = score_key(model, prep, tta)
    hit = cache.get(key)
    if hit is not None:
        return hit
    paths = [model / "emb" / f"{prep.root.name}-{split}-{tta or 'plain'}.npy" for split in ("query", "gallery")]
    for split, path in zip(("query", "gallery"), paths):
        fp.embed(model, prep.folder(split), path, tta)
    rec = {"key": key, **meta, "protocol": prep.protocol, "seed": prep.seed, **fp.evaluate(*paths, prep.labels)}
    print(f"  {prep.protocol} seed {prep.seed}  {meta['row']:28s} R@1 {rec['recall@1']:.3f}  MAP@R {rec['map@r']:.3f}  "
          f"mAP {rec['map']:.3f}  train {meta.get('train_s', 0):.0f} s", flush=True)
    return cache.put(rec)


def pixels(prep: fp.Prepared, cache: fp.ResultCache) -> dict[str, Any]:
    key = fp.settings_key({"v": VERSION, "pixels": prep.root.name})
    if cache.get(key) is None:
        q, g = fp.raw_pixels(prep.root, prep.run.parent.parent / "pixels" / prep.root.name)
        cache.put({"key": key, "row": "raw pixels", "protocol": prep.protocol, "seed": prep.seed, **fp.evaluate(q, g, prep.labels)})
    return cache.get(key)  # type: ignore[return-value]


def train_row(args: argparse.Namespace, protocol: str, seed: int, row: Row, cache: fp.ResultCache,
              extra: dict[str, Any] | None = None, name: str | None = None,
              need_run: bool = False) -> tuple[fp.Prepared, dict[str, Any]]:
    """Train (once) with the row's overrides and score it. A row already in the cache is not retrained
    when its run folder is gone, unless the caller ``need_run`` (reads the run's files)."""
    train = {**args.train, **row.train, **(extra or {})}
    prep = fp.locate(args.work, protocol, seed, args.sizes, train)
    hit = cache.get(score_key(prep.run, prep, row.tta))
    if hit is not None and not need_run:
        return prep, hit
    prep = fp.prepare(args.work, protocol, seed, args.sizes, train)
    meta = {"row": name or row.name, "run": prep.run.name, "train_s": prep.train_seconds, "flags": row.flags()}
    return prep, score(prep.run, prep, row.tta, cache, meta)


def ablation(args: argparse.Namespace, protocol: str, cache: fp.ResultCache) -> dict[str, dict[int, dict]]:
    """Every selected row of one protocol, by row name and seed."""
    recs: dict[str, dict[int, dict]] = {}
    for seed in args.final_seeds:
        prep, recs.setdefault(DEFAULT, {})[seed] = train_row(args, protocol, seed, ROWS[0], cache)
        recs.setdefault("raw pixels", {})[seed] = pixels(prep, cache)
        meta = {"row": "untrained network", "train_s": 0.0}
        recs.setdefault("untrained network", {})[seed] = score(untrained(prep, args), prep, None, cache, meta)
    for row in ROWS[1:]:
        if args.rows and not any(f in (row.name, row.family) for f in args.rows):
            continue
        for seed in args.seeds:
            recs.setdefault(row.name, {})[seed] = train_row(args, protocol, seed, row, cache)[1]
    return recs


def finetune(args: argparse.Namespace, cache: fp.ResultCache) -> tuple[dict[str, dict[int, dict]], dict[int, dict]]:
    """The fine-tuning proxy over ``--final-seeds``: rows by name and seed, and per seed the epoch check."""
    recs: dict[str, dict[int, dict]] = {}
    checks: dict[int, dict] = {}
    for seed in args.final_seeds:
        base = fp.prepare(args.work, "open", seed, args.sizes, args.train)  # pretrained on classes 0-5
        scratch, recs.setdefault("random init, same budget", {})[seed] = train_row(
            args, "finetune", seed, ROWS[0], cache, name="random init, same budget")
        meta = {"row": "pretrained embedding", "run": base.run.name, "train_s": base.train_seconds}
        recs.setdefault("pretrained embedding", {})[seed] = score(base.run, scratch, None, cache, meta)
        tuned, recs.setdefault("fine-tuned (default)", {})[seed] = train_row(
            args, "finetune", seed, ROWS[0], cache, {"pretrained": str(base.run)}, name="fine-tuned (default)",
            need_run=True)  # its metrics.jsonl gives the per-epoch check
        history = [json.loads(line) for line in (tuned.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        start = next((r.get("val_map@r") for r in history if r["epoch"] == 0), None)
        epochs = [r["val_map@r"] for r in history if r["epoch"] > 0 and "val_map@r" in r]
        checks[seed] = {"start": start, "min": min(epochs) if epochs else None,
                        "never_below": start is not None and bool(epochs) and min(epochs) >= start}
    return recs, checks


NOISE_FLOOR = 0.01  # MAP@R: a smaller mean Δ is "within noise" however small its std (two seeds barely estimate one)


def verdict(delta: float, std: float) -> str:
    """A row's paired ΔMAP@R against the default, in words: beyond its std and the noise floor, or not."""
    if abs(delta) < NOISE_FLOOR or abs(delta) <= std:
        return "within noise"
    return "better" if delta > 0 else "worse"


def table(recs: dict[str, dict[int, dict]], baseline: str, order: list[str]) -> str:
    summary = summarize(recs, baseline, (*METRICS, "train_s"))
    out = []
    for name in order:
        if name not in summary:
            continue
        t = summary[name]
        d = t["delta"]["map@r"]
        reference = name == baseline or name in ("raw pixels", "untrained network", "pretrained embedding")
        note = "" if reference or len(t["seeds"]) < 2 else verdict(*d)
        flags = next((r.flags() for r in ROWS if r.name == name), "")
        out.append([name, flags, *[fmt_pm(t[k]) for k in METRICS], fmt_pm(d, signed=True),
                    "–" if t["train_s"][0] != t["train_s"][0] else f"{t['train_s'][0]:.0f}", str(len(t["seeds"])), note])
    return markdown_table(["row", "change", "R@1", "MAP@R", "mAP", "ΔMAP@R", "train s", "seeds", "note"], out)


def targets(closed: dict | None, open_: dict | None, ft: tuple[dict, dict] | None) -> list[tuple[str, bool]]:
    """The issue's targets, each checked on every final seed: (what, met)."""
    out = []
    if closed:
        d = closed[DEFAULT]
        out.append(("closed set, default recipe: R@1 >= 0.85 and MAP@R >= 0.55 on every seed",
                    all(r["recall@1"] >= 0.85 and r["map@r"] >= 0.55 for r in d.values())))
        out.append(("closed set: training <= 600 s on every seed", all(r["train_s"] <= 600 for r in d.values())))
    if open_:
        px = open_["raw pixels"]
        out.append(("open set: MAP@R >= raw pixels + 0.10 on every seed",
                    all(r["map@r"] >= px[s]["map@r"] + 0.10 for s, r in open_[DEFAULT].items())))
    if ft:
        recs, checks = ft
        pre = recs["pretrained embedding"]
        out.append(("fine-tuning proxy: MAP@R >= pretrained embedding + 0.10 on every seed",
                    all(r["map@r"] >= pre[s]["map@r"] + 0.10 for s, r in recs["fine-tuned (default)"].items())))
        out.append(("fine-tuning proxy: no epoch's validation MAP@R below the starting weights'",
                    all(c["never_below"] for c in checks.values())))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = fp.ResultCache(args.out)
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"reproduce: python bench/recipe.py {argv_text}   (from the repository root)", flush=True)
    results: dict[str, Any] = {}
    for protocol in args.protocols:
        results[protocol] = ablation(args, protocol, cache)
    ft = finetune(args, cache) if args.finetune else None
    order = ["raw pixels", "untrained network", *[r.name for r in ROWS]]
    print(f"\ndefault recipe given: {args.train}; {args.sizes}; {_machine()}")
    for protocol, recs in results.items():
        print(f"\n### {protocol} set\n\n{table(recs, DEFAULT, order)}")
    if ft is not None:
        recs, checks = ft
        print("\n### fine-tuning proxy (pretrained on classes 0-5, fine-tuned and scored on 6-9)\n")
        print(table(recs, "fine-tuned (default)", ["pretrained embedding", "random init, same budget", "fine-tuned (default)"]))
        print("\nvalidation MAP@R of the fine-tune, starting weights (epoch 0) → lowest epoch: "
              + "; ".join(f"seed {s}: {c['start']:.3f} → {c['min']:.3f}" for s, c in checks.items() if c["start"] is not None))
    print("\nmean ± sample std over seeds; Δ paired per seed against the table's default row; 'better'/'worse': "
          "|mean Δ| beyond its std and ≥ 0.01, else 'within noise'. train s: wall time of the training (first session).")
    met = targets(results.get("closed"), results.get("open"), ft)
    for what, ok in met:
        print(f"target {'MET' if ok else 'NOT MET'}: {what}")
    return 0


def _machine() -> str:
    import os

    import torch

    return f"CPU: {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocols", nargs="+", choices=("closed", "open"), default=["closed", "open"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the ablation rows")
    ap.add_argument("--final-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the references and the default")
    ap.add_argument("--rows", nargs="*", default=[], help="only these ablation rows (names or families: aug, pool, head, "
                    "miner, warmup, lr, loss, tta; 'default': none, the references and the default only); default: all")
    ap.add_argument("--no-finetune", dest="finetune", action="store_false", help="skip the fine-tuning proxy")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-recipe/results.jsonl"), help="resumable JSON-lines results")
    fp.add_data_arguments(ap, train_per_class=1000)
    ap.add_argument("--model", type=Path, help="open_clip config JSON of the network (default: "
                    "bench/configs/fmnist-vit.json, the tiny ViT)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: few images, 1 epoch, a few rows, one seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_per_class, args.query_per_class, args.gallery_per_class, args.epochs, args.k = 12, 3, 6, 1, 4
        args.seeds, args.final_seeds, args.rows = [0], [0], args.rows or ["head: no BatchNorm", "loss: ArcFace", "tta"]
    args.sizes = fp.Sizes(args.train_per_class, args.query_per_class, args.gallery_per_class)
    args.train = {"epochs": args.epochs, "lr": args.lr, "p": args.p, "k": args.k, "workers": 0}
    if args.model is not None:
        if not args.model.is_file():
            ap.error(f"--model {args.model}: no such file")
        args.train["model"] = str(args.model.resolve())
    args.work = (args.work or args.out.parent / (args.out.stem + ".work")).resolve()
    return args


if __name__ == "__main__":
    sys.exit(main())
