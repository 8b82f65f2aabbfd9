"""Fast JPEG decoding (PIL ``draft``, DCT-domain downscaling) against the full decode: agreement and speed.

For each margin (the decoded image keeps both sides >= margin x the model's
input side), embeds the same photo-like JPEGs (bench/embed.py's generator,
2000x1500, quality 90) once with the full decode and once with the fast one,
in the same process, and prints the mean and minimum cosine between the two
embeddings of each image and the decode+preprocess time ratio. clipret makes
fast decoding the default only if the mean cosine is >= 0.999.

    python bench/decode.py --n 200 --model ViT-B-32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip name or config JSON (random init)")
    ap.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clipret-bench/embed"))
    args = ap.parse_args()

    import torch
    from embed import ensure_photos

    from clipret.data import decode
    from clipret.data.layout import list_images
    from clipret.data.transforms import eval_transform
    from clipret.model.build import open_encoder

    folder, _ = ensure_photos(args.cache, args.n, 0, 2000, 1500, 90)
    ids = list_images(folder)[: args.n]
    encoder, spec, _ = open_encoder(args.model, "none")
    transform = eval_transform(spec.preprocess)
    size = spec.preprocess["size"]
    side = size if isinstance(size, int) else max(size)
    torch.set_grad_enabled(False)

    def run(min_side: int | None) -> tuple[np.ndarray, float]:
        t_io, out = 0.0, []
        for i in range(0, len(ids), 32):
            t0 = time.perf_counter()
            batch = torch.stack([transform(decode.load_rgb(folder / j, min_side)[0]) for j in ids[i : i + 32]])
            t_io += time.perf_counter() - t0
            out.append(torch.nn.functional.normalize(encoder(batch).float(), dim=-1).numpy())
        return np.concatenate(out), t_io

    exact, t_exact = run(None)
    print(f"{args.model} (random init), input {side}px, {len(ids)} JPEGs 2000x1500 q90; full decode+preprocess {t_exact:.1f}s")
    print(f"{'margin':>6s} {'decoded side >=':>15s} {'mean cos':>10s} {'min cos':>10s} {'full/fast time':>15s}")
    for m in args.margins:
        fast, t_fast = run(int(side * m))
        cos = (fast * exact).sum(axis=1)
        print(f"{m:6.1f} {int(side * m):15d} {cos.mean():10.6f} {cos.min():10.6f} {t_exact / t_fast:15.2f}")


if __name__ == "__main__":
    main()
