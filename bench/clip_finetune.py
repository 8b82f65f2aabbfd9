"""Zero-shot CLIP against clipret's fine-tune, on CIFAR-100 or Food-101, with a real open_clip model.

The comparison a user makes before adopting clipret, through the real commands:

1. **zero-shot**: ``clipret embed`` with the backbone's own CLIP embedding (``--model ViT-B-32
   --pretrained openai``), then ``clipret evaluate``;
2. **fine-tuned**: ``clipret train`` from the same weights with the default recipe, then embed and
   evaluate with the run;
3. **fine-tuned + post-processing**: the run's embeddings with ``--tta flip``, scored with
   ``--rerank --qe``.

Protocols: *closed* trains on the training split of every class and retrieves among the test
split's images of the same classes; *open* trains on the first half of the classes and
retrieves among the other half (the usual metric-learning split). Query and gallery are
disjoint test images, ``--query-per-class`` and ``--gallery-per-class`` per class.

Data is read locally, never downloaded:

- CIFAR-100, binary version (``cifar-100-binary/{train,test}.bin`` under ``--data``; from
  https://www.cs.toronto.edu/~kriz/cifar.html). It is parsed as raw bytes: nothing is unpickled.
- Food-101 (``food-101/images`` and ``food-101/meta/{train,test}.json`` under ``--data``, as
  ``torchvision.datasets.Food101`` lays it out).

It fails fast, in one line and before any work, where the weights or the data are missing.
Everything is kept under ``--work``; a step whose output exists is not redone.

    python bench/clip_finetune.py --dataset cifar100 --data ~/data --device cuda           # ViT-B-32, openai
    python bench/clip_finetune.py --dataset food101 --data ~/data --pretrained laion2b_s34b_b79k --protocol open
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError

CIFAR_RECORD = 2 + 32 * 32 * 3  # coarse label, fine label, then R, G and B planes


def read_cifar100(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) fine labels of CIFAR-100's binary ``split`` (train/test)."""
    path = data / "cifar-100-binary" / f"{split}.bin"
    if not path.is_file():
        raise ClipretError(f"CIFAR-100 not found: no {path}; put the binary version (cifar-100-binary.tar.gz from "
                           "https://www.cs.toronto.edu/~kriz/cifar.html) under --data")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % CIFAR_RECORD:
        raise ClipretError(f"{path} is not CIFAR-100 binary data (size {raw.size} is not a multiple of {CIFAR_RECORD})")
    rec = raw.reshape(-1, CIFAR_RECORD)
    return rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 1].astype(np.int64)


def food101_files(data: Path, split: str) -> list[tuple[str, str]]:
    """``[(image path, class)]`` of Food-101's ``split`` (train/test), from its meta JSON."""
    root = data / "food-101"
    meta = root / "meta" / f"{split}.json"
    if not meta.is_file():
        raise ClipretError(f"Food-101 not found: no {meta}; download food-101.tar.gz (or use "
                           "torchvision.datasets.Food101 on a machine with network) and put it under --data")
    listing = json.loads(meta.read_text())
    return [(str(root / "images" / f"{item}.jpg"), cls) for cls, items in sorted(listing.items()) for item in items]


def export(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Write the protocol's subset in clipret's layout under ``root`` once; return its summary."""
    done = root / "export.json"
    if done.is_file():
        return json.loads(done.read_text())
    from PIL import Image

    from clipret.data.layout import write_labels_csv

    rng = np.random.default_rng(args.seed)
    if args.dataset == "cifar100":
        splits = {s: read_cifar100(args.data, s) for s in ("train", "test")}
        classes = [f"c{c:02d}" for c in range(100)]
        items = {s: [(i, classes[y]) for i, y in enumerate(labels.tolist())] for s, (_, labels) in splits.items()}
    else:
        listing = {s: food101_files(args.data, s) for s in ("train", "test")}
        classes = sorted({c for _, c in listing["train"]})
        items = {s: [(i, c) for i, (_, c) in enumerate(files)] for s, files in listing.items()}
    half = len(classes) // 2
    train_classes = set(classes if args.protocol == "closed" else classes[:half])
    test_classes = set(classes if args.protocol == "closed" else classes[half:])

    def save(split: str, i: int, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.dataset == "cifar100":
            Image.fromarray(splits[split][0][i]).save(path)
        else:
            with Image.open(listing[split][i][0]) as im:
                im.convert("RGB").save(path, quality=95)

    ext = "png" if args.dataset == "cifar100" else "jpg"
    rows, counts = [], {"n_train": 0, "n_query": 0, "n_gallery": 0}
    for cls in classes:
        train = [i for i, c in items["train"] if c == cls]
        test = [i for i, c in items["test"] if c == cls]
        if cls in train_classes:
            for i in sorted(rng.permutation(train)[: args.train_per_class].tolist()):
                save("train", i, root / "training" / cls / f"tr{i:06d}.{ext}")
                counts["n_train"] += 1
        if cls in test_classes:
            picked = rng.permutation(test)[: args.query_per_class + args.gallery_per_class].tolist()
            for n, i in enumerate(picked):
                split = "query" if n < args.query_per_class else "gallery"
                save("test", i, root / "test" / split / cls / f"te{i:06d}.{ext}")
                rows.append((f"{cls}/te{i:06d}.{ext}", cls))
                counts["n_" + split] += 1
    write_labels_csv(root / "test" / "labels.csv", rows)
    summary = {"dataset": args.dataset, "protocol": args.protocol, "classes": len(classes), **counts}
    done.write_text(json.dumps(summary))
    return summary


def check_weights(model: str, pretrained: str) -> None:
    """Fail fast (ClipretError, one line) when ``pretrained`` cannot be had here."""
    from clipret.model import backbone
    from clipret.model.build import make_spec

    spec = make_spec(model, pretrained, pool="clip")
    backbone.fetch_weights(spec.backbone, spec.pretrained)


def clipret(args: argparse.Namespace, *cmd: Any, out: Path | None = None) -> str:
    """Run ``python -m clipret CMD`` (skipped when ``out`` exists); return its stdout."""
    if out is not None and out.exists():
        return ""
    argv = [sys.executable, "-m", "clipret", *map(str, cmd)]
    print(f"$ {shlex.join(argv[2:])}", flush=True)
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ClipretError(f"{shlex.join(argv[2:])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout


def evaluate(args: argparse.Namespace, root: Path, q: Path, g: Path, *stages: str) -> dict[str, float]:
    text = clipret(args, "evaluate", "--query", q, "--gallery", g, "--labels", root / "test" / "labels.csv",
                   "--k", 1, "--json", *stages)
    m = json.loads(text)
    return {"recall@1": m["recall@1"], "map@r": m["map@r"], "map": m["map"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ClipretError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.pretrained.lower() != "none":
        check_weights(args.model, args.pretrained)
    work = args.work / f"{args.dataset}-{args.protocol}-s{args.seed}"
    root = work / "data"
    summary = export(args, root)
    print(f"data: {summary}", flush=True)
    dev = ["--device", args.device]
    q0, g0 = work / "zero-shot-query.npy", work / "zero-shot-gallery.npy"
    for split, out in (("query", q0), ("gallery", g0)):
        clipret(args, "embed", root / "test" / split, "--model", args.model, "--pretrained", args.pretrained,
                "--out", out, *dev, out=out)
    rows = {"zero-shot (CLIP's own embedding)": evaluate(args, root, q0, g0)}
    run_dir = work / "run"
    t0 = time.perf_counter()
    clipret(args, "train", root, "--model", args.model, "--pretrained", args.pretrained, "--epochs", args.epochs,
            "--out", run_dir, *dev, *args.train_args, out=run_dir / "model.safetensors")
    train_s = time.perf_counter() - t0
    emb = {}
    for tta in (None, "flip"):
        for split in ("query", "gallery"):
            out = work / f"tuned-{split}-{tta or 'plain'}.npy"
            clipret(args, "embed", root / "test" / split, "--model", run_dir, "--out", out, *dev,
                    *(["--tta", tta] if tta else []), out=out)
            emb[(split, tta)] = out
    rows["fine-tuned (clipret train)"] = evaluate(args, root, emb[("query", None)], emb[("gallery", None)])
    rows["fine-tuned + --tta flip --rerank --qe"] = evaluate(args, root, emb[("query", "flip")], emb[("gallery", "flip")],
                                                             "--rerank", "--qe", 5)
    print(f"\n{args.dataset}, {args.protocol} set, {args.model} ({args.pretrained}), {args.epochs} epochs, "
          f"seed {args.seed}; training {train_s:.0f} s (0 if the run existed)\n")
    print("| row | R@1 | MAP@R | mAP |\n| --- | --- | --- | --- |")
    for name, m in rows.items():
        print(f"| {name} | {m['recall@1']:.3f} | {m['map@r']:.3f} | {m['map']:.3f} |")
    (work / "table.json").write_text(json.dumps({"summary": summary, "train_s": train_s, "rows": rows}, indent=1))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("cifar100", "food101"), required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder holding cifar-100-binary/ or food-101/")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name or config JSON")
    ap.add_argument("--pretrained", default="openai", help="open_clip tag, weights file, or none")
    ap.add_argument("--protocol", choices=("closed", "open"), default="closed")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--query-per-class", type=int, default=10)
    ap.add_argument("--gallery-per-class", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-clip-finetune"))
    ap.add_argument("--train-arg", dest="train_args", action="append", default=[],
                    help="extra `clipret train` argument, repeatable (e.g. --train-arg=--p --train-arg=16)")
    args = ap.parse_args(argv)
    args.data = args.data.expanduser()
    return args


if __name__ == "__main__":
    sys.exit(main())
