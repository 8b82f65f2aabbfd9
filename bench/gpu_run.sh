#!/usr/bin/env bash
# The benchmarks on a GPU machine, as one prepared run (about 4-5 minutes on one H100).
#
#   bash bench/gpu_run.sh                              # from the repo root; results and log in $OUT (else ./bench-out)
#   CLIPRET_BENCH_DEVICE=cpu bash bench/gpu_run.sh     # a tiny CPU dry run of every stage (checks the invocations)
#
# Stages, each under `timeout` and inside an overall budget (CLIPRET_BENCH_BUDGET seconds, default 450), so a
# stuck or failing stage cannot eat the others' time; every stage prints as it goes and a failure is logged, not fatal:
#   1. wheels in .whl/ (if any) into /tmp/site; GPU name and versions
#   2. bench/train.py  ViT-B-32: fp32, tf32, bf16, bf16+ckpt; P×K 32×4 at 224 px
#   3. bench/train.py  ViT-L-14: fp32, bf16, bf16+ckpt;       P×K 32×4 at 224 px (fp32 may not fit: logged as OOM)
#   4. bench/embed.py  ViT-B-32, then ViT-L-14: clipret embed vs the naive loop on 400 generated 2000×1500 JPEGs
#   5. bench/embed.py  the tiny model (decoding dominates), if time is left
# Writes $OUT/train-vit-b-32.json, train-vit-l-14.json, embed-vit-b-32.json, embed-vit-l-14.json, embed-tiny.json,
# and $OUT/gpu_run.log.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
PY=${PYTHON:-python3}
DEVICE=${CLIPRET_BENCH_DEVICE:-cuda}
BUDGET=${CLIPRET_BENCH_BUDGET:-450}
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
for name in ("open_clip", "pytorch_metric_learning", "clipret"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"), "from", m.__file__)
    except Exception as exc:
        print(name, "FAILED:", type(exc).__name__, exc)
EOF

if [[ $DEVICE == cpu ]]; then  # dry run: every invocation below, tiny sizes
  B32=clipret/configs/tiny-vit.json L14=clipret/configs/tiny-vit.json
  TRAIN=(--device cpu --p 2 --k 2 --steps 1 --warmup-steps 0 --n-images 400 --n-classes 40 --in-process)
  TRAIN_B=(--variants fp32,ckpt) TRAIN_L=(--variants fp32)
  EMBED=(--device cpu --n 6 --width 320 --height 240 --batch-size 4 --cache "$CACHE-dry")
else
  B32=ViT-B-32 L14=ViT-L-14
  TRAIN=(--device "$DEVICE" --p 32 --k 4 --image-size 224)
  TRAIN_B=(--variants fp32,tf32,bf16,bf16+ckpt --steps 8 --warmup-steps 3)
  TRAIN_L=(--variants fp32,bf16,bf16+ckpt --steps 5 --warmup-steps 2)
  EMBED=(--device "$DEVICE" --n 400 --batch-size 64 --cache "$CACHE")
fi

stage "train ViT-B-32" 100 "$PY" bench/train.py --model "$B32" "${TRAIN[@]}" "${TRAIN_B[@]}" --json "$OUT/train-vit-b-32.json"
stage "train ViT-L-14" 150 "$PY" bench/train.py --model "$L14" "${TRAIN[@]}" "${TRAIN_L[@]}" --json "$OUT/train-vit-l-14.json"
stage "embed ViT-B-32" 100 "$PY" bench/embed.py --model "$B32" "${EMBED[@]}" --json "$OUT/embed-vit-b-32.json"
stage "embed ViT-L-14" 100 "$PY" bench/embed.py --model "$L14" "${EMBED[@]}" --json "$OUT/embed-vit-l-14.json"
stage "embed tiny" 60 "$PY" bench/embed.py --model-preset tiny "${EMBED[@]}" --json "$OUT/embed-tiny.json"
echo "=== done after ${SECONDS}s; results in $OUT"
ls -l "$OUT"
