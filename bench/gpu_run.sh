#!/usr/bin/env bash
# The benchmarks on a GPU machine, as one prepared run (about 7-8 minutes on one H100/H200; 9 at most).
#
#   bash bench/gpu_run.sh                              # from the repo root; results and log in $OUT (else ./bench-out)
#   CLIPRET_BENCH_DEVICE=cpu bash bench/gpu_run.sh     # a tiny CPU dry run of every stage (checks the invocations)
#
# Stages, each under `timeout` and inside an overall budget (CLIPRET_BENCH_BUDGET seconds, default 510), so a
# stuck or failing stage cannot eat the others' time; every stage prints as it goes and a failure is logged, not
# fatal. In order of importance (the last ones run only if time is left):
#   1. wheels in .whl/ (if any) into /tmp/site; GPU name and versions
#   2. bench/embed.py --steady  ViT-B-32: 20,000 images of 640×480 and of 2000×1500 (1,000 distinct each):
#      decode only (PIL in workers; nvJPEG + GPU resize), forward only (plain, channels_last), whole embed (auto),
#      and the cosine between the two decode paths' embeddings on 256 images
#   3. bench/embed.py --steady  ViT-L-14: forward only, whole embed (auto) on the same sets (decode only: as ViT-B-32's,
#      the same 224 px preprocessing)
#   4. bench/train.py  ViT-L-14: bf16, bf16+ckpt; P×K 32×4 at 224 px; FLOPs per step and MFU
#   5. bench/evaluate.py --device cuda: clipret evaluate at 20,000 × 1,000,000 × 256 against a bare torch matmul
#   6. bench/train.py  ViT-B-32: bf16; MFU
#   7. bench/train.py  ViT-L-14 bf16+compile, then ViT-B-32 bf16+compile (torch.compile; compile time in the warm-up)
#   8. a summary of every JSON, as rows for docs/benchmarks.md
# Writes $OUT/steady-vit-b-32.json, steady-vit-l-14.json, train-vit-l-14.json, evaluate-gpu.json, train-vit-b-32.json,
# train-vit-l-14-compile.json, train-vit-b-32-compile.json and $OUT/gpu_run.log. (The whole-process naive-loop
# comparison of bench/embed.py without --steady is no longer run here; docs/benchmarks.md keeps its H100 table.)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
PY=${PYTHON:-python3}
DEVICE=${CLIPRET_BENCH_DEVICE:-cuda}
BUDGET=${CLIPRET_BENCH_BUDGET:-510}
CACHE=${CLIPRET_BENCH_CACHE:-/tmp/clipret-bench/embed}

# stage NAME LIMIT_S CMD...: run CMD under timeout, capped by what is left of BUDGET; never fails the script
stage() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc
  shift 2
  if ((left < 20)); then echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"; return 0; fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, $(date +%T))"
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  stage "install wheels" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'EOF'
import sys, torch, torchvision
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("open_clip", "pytorch_metric_learning", "clipret", "faiss"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"), "from", m.__file__)
    except Exception as exc:
        print(name, "FAILED:", type(exc).__name__, exc)
EOF

if [[ $DEVICE == cpu ]]; then  # dry run: every invocation below, tiny sizes
  B32=clipret/configs/tiny-vit.json L14=clipret/configs/tiny-vit.json
  TRAIN=(--device cpu --p 2 --k 2 --steps 1 --warmup-steps 0 --n-images 400 --n-classes 40 --in-process)
  TRAIN_B=(--variants fp32) TRAIN_L=(--variants fp32,ckpt) COMPILE=(--variants fp32)  # no torch.compile on the CPU
  STEADY=(--device cpu --n 8 --distinct 4 --sets 80x60,120x90 --batch-size 4 --workers 0 --check 4 --cache "$CACHE-dry")
  STEADY_B=(--paths pil,gpu --forward-variants plain,channels_last --whole auto,pil) STEADY_L=(--paths none --whole auto)
  EVAL=(--device cpu --torch-floor --queries 50 --gallery 2000 --dim 32 --old-subset 0 --cache "$CACHE-dry-eval")
else
  B32=ViT-B-32 L14=ViT-L-14
  TRAIN=(--device "$DEVICE" --p 32 --k 4 --image-size 224)
  TRAIN_B=(--variants bf16 --steps 8 --warmup-steps 3) TRAIN_L=(--variants bf16,bf16+ckpt --steps 5 --warmup-steps 2)
  COMPILE=(--variants bf16+compile --steps 5 --warmup-steps 3)
  STEADY=(--device "$DEVICE" --n 20000 --distinct 1000 --sets 640x480,2000x1500 --cache "$CACHE")
  STEADY_B=(--paths pil,gpu --forward-variants plain,channels_last --whole auto) STEADY_L=(--paths none --whole auto)
  EVAL=(--device "$DEVICE" --queries 20000 --gallery 1000000 --dim 256 --old-subset 0)
fi

stage "steady embed ViT-B-32" 150 "$PY" bench/embed.py --steady --model "$B32" "${STEADY[@]}" "${STEADY_B[@]}" --json "$OUT/steady-vit-b-32.json"
stage "steady embed ViT-L-14" 130 "$PY" bench/embed.py --steady --model "$L14" "${STEADY[@]}" "${STEADY_L[@]}" --json "$OUT/steady-vit-l-14.json"
stage "train ViT-L-14" 120 "$PY" bench/train.py --model "$L14" "${TRAIN[@]}" "${TRAIN_L[@]}" --json "$OUT/train-vit-l-14.json"
stage "evaluate on the GPU" 120 "$PY" bench/evaluate.py "${EVAL[@]}" --json "$OUT/evaluate-gpu.json"
stage "train ViT-B-32" 60 "$PY" bench/train.py --model "$B32" "${TRAIN[@]}" "${TRAIN_B[@]}" --json "$OUT/train-vit-b-32.json"
stage "train ViT-L-14 compile" 150 "$PY" bench/train.py --model "$L14" "${TRAIN[@]}" "${COMPILE[@]}" --json "$OUT/train-vit-l-14-compile.json"
stage "train ViT-B-32 compile" 90 "$PY" bench/train.py --model "$B32" "${TRAIN[@]}" "${COMPILE[@]}" --json "$OUT/train-vit-b-32-compile.json"

echo "=== summary (rows for docs/benchmarks.md)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
for name in ("steady-vit-b-32.json", "steady-vit-l-14.json"):
    r = load(name)
    if not r:
        print(f"{name}: missing"); continue
    fwd = max(v["img_s"] for v in r["forward"].values())
    print(f"{r['model']} on {r['gpu'] or r['device']}: forward only " + ", ".join(f"{k} {v['img_s']:.0f}" for k, v in r["forward"].items()) + " img/s")
    for s in r["sets"]:
        dec = " | ".join(f"{s['decode'].get(p, 0):.0f}" if p in s["decode"] else "—" for p in ("pil", "gpu"))
        who = " | ".join(f"{k} {v['img_s']:.0f} ({v['img_s'] / fwd:.2f}× fwd)" for k, v in s["whole"].items())
        cos = f"{s['cosine']['min']:.5f}" if "cosine" in s else "—"
        print(f"| {r['model']} | {s['set']} | {dec} | {fwd:.0f} | {who} | {s['limit']} | {cos} |")
for name in ("train-vit-l-14.json", "train-vit-b-32.json", "train-vit-l-14-compile.json", "train-vit-b-32-compile.json"):
    r = load(name)
    if not r:
        print(f"{name}: missing"); continue
    for row in r["rows"]:
        if "error" in row:
            print(f"| {row['model']} | {row['variant']} | {row['error']} |"); continue
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "n/a"
        print(f"| {row['model']} | {row['variant']} | {row['img_s']:.0f} | {row['flops'] / 1e9:.0f} | {row['tflops_s']:.1f} | {mfu} | {r.get('gpu')} |")
r = load("evaluate-gpu.json")
if r:
    print(f"| evaluate {r['queries']} × {r['gallery']} × {r['dim']} on {r['device']} | clipret {r['clipret_s']:.1f} s | "
          f"torch floor {r.get('torch_floor_s', float('nan')):.1f} s | ratios {r['ratios']} | "
          f"split {r.get('device_split')} |")
else:
    print("evaluate-gpu.json: missing")
EOF
echo "=== done after ${SECONDS}s; results in $OUT"
ls -l "$OUT"
