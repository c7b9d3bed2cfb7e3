#!/usr/bin/env bash
# One unattended benchmark run on a single-GPU machine, at most 8 minutes (--budget), no network needed.
#
#   bench/fetch_gpu_wheels.sh          # beforehand, on a machine with PyPI: cp312 wheels into .whl/
#   bench/gpu.sh                       # on the GPU machine: writes the `## GPU` section of bench/RESULTS.md
#   bench/gpu.sh --dry-run             # tiny settings on the CPU, nothing installed (what the test runs)
#   bench/gpu.sh --only finetune,model # some of the steps (names below; 'model' = model_jax + model_torch)
#
# Steps, most important first, each under a time limit cut to what is left of the budget (a step that
# fails or times out is reported and the next one runs):
#   install    pip install --no-index --find-links .whl -r bench/requirements-gpu-wheels.txt
#   finetune   Part fViT base, bf16, cuDNN fused attention, Partial FC 1M classes r=0.1, the real step
#              (bench/finetune.py), with a jax.profiler trace of two steps summarised by kernel
#   model      the Part fViT base forward / forward+backward in JAX (bench/model.py --frameworks jax) and in
#              the PyTorch mirror of the official model (--frameworks torch, bf16 autocast), each in its own
#              process so the two frameworks' CUDA libraries never meet
#   lafs       LAFS base pretraining step (bench/pretrain.py), bf16, cuDNN attention, then its trace
#   dino       DINO-face base pretraining step
#   fra        FRA pretraining step (ResNet-50, 224 px, both views, online + target, LARS, EMA, views made on
#              the device; bench/pretrain.py --methods fra --augment-on device), bf16
#   report     bench/gpu_report.py: JSON lines -> `## GPU` section (date, device, img/s/device, step ms,
#              MFU against the GPU's dense bf16 peak, peak memory, JAX / PyTorch, dominant kernels)
# Batches fill an H100 / H200 (a `/` list falls back to the next size on out-of-memory).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=runs/gpu_bench
RESULTS=""
BUDGET=""
ONLY="finetune,model,lafs,dino,fra"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --results) RESULTS="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --dry-run, --out DIR, --results FILE, --budget SECONDS," \
            "--only finetune,model,lafs,dino,fra)" >&2
       exit 2 ;;
  esac
  shift
done
for s in ${ONLY//,/ }; do
  case "$s" in finetune|model|lafs|dino|fra) ;; *) echo "bench/gpu.sh: --only: unknown step $s" >&2; exit 2 ;; esac
done
wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
START=$(date +%s)
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/lines.jsonl"
: > "$OUT/status.txt"
RESERVE=25  # seconds kept for the report

if [ "$DRY" = 1 ]; then
  [ -n "$RESULTS" ] || RESULTS="$OUT/RESULTS.md"  # never the repository's file with CPU numbers
  [ -n "$BUDGET" ] || BUDGET=1800  # a shared CPU is slow to compile; the 8 minutes are the GPU's
  export JAX_PLATFORMS=cpu
  SMALL_MODEL=(--set model.depth=1 --set "model.landmark.blocks=((3,16,16,False,'RE',2),)")
  FT_ARGS=(--recipe configs/finetune.py:tiny --num-classes 64 --sample-rate 0.5 --batch 2 --steps 1 "${SMALL_MODEL[@]}")
  LAFS_ARGS=(--presets tiny --batch tiny=1 --steps 1 "${SMALL_MODEL[@]}" --set data.lafs.local_views=1)
  DINO_ARGS=(--presets tiny --batch tiny=1 --steps 1 --set model.depth=1 --set data.dino.local_crops=1)
  FRA_ARGS=(--presets tiny --batch tiny=2 --steps 1 --set model.resnet.width=8 --set "model.resnet.layers=(1,1,1,1)"
            --set model.dim=64 --set model.image_size=32 --set fra.view_size=32 --set fra.hidden_dim=32
            --set fra.out_dim=16 --set fra.num_proto=4 --set fra.decoder_layers=1 --set data.image_size=48
            --set "data.ssl_color.global_blur_probs=(0.0,0.0)")
  MODEL_ARGS=(--presets tiny --batch-tiny 2 --iters 1 --modes forward --set depth=1
              --set "landmark.blocks=((3,16,16,False,'RE',2),)")
  ATTENTION=xla
  LIMITS=(finetune=200 model_jax=120 model_torch=60 lafs=200 dino=150 fra=300)
else
  [ -n "$RESULTS" ] || RESULTS=bench/RESULTS.md
  [ -n "$BUDGET" ] || BUDGET=480  # a session has 15 device minutes, starts included: room for a rerun
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  FT_ARGS=(--recipe configs/finetune.py:webface4m --num-classes 1000000 --sample-rate 0.1 --batch 384/256/128
           --steps 6 --precision bfloat16)
  LAFS_ARGS=(--presets base --batch base=128/64/32 --steps 4)
  DINO_ARGS=(--presets base --batch base=128/64/32 --steps 4)
  FRA_ARGS=(--presets base --batch base=256/128/64 --steps 4)
  MODEL_ARGS=(--presets base --batch-base 256 --iters 5 --modes forward,forward_backward)
  ATTENTION=cudnn
  LIMITS=(finetune=150 model_jax=80 model_torch=60 lafs=100 dino=80 fra=100)
fi

limit_of() { for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

# step NAME COMMAND...: run under min(its limit, what is left); JSON lines to $OUT/lines.jsonl
step() {
  local name=$1; shift
  local limit; limit=$(limit_of "$name")
  local t; t=$(left)
  [ "$t" -gt "$limit" ] && t=$limit
  if [ "$t" -lt 15 ]; then
    echo "$name skipped: budget spent" >> "$OUT/status.txt"; return
  fi
  local t0; t0=$(date +%s)
  timeout -k 5 "$t" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  grep '^{' "$OUT/$name.out" | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/lines.jsonl"
  local why=""
  [ "$rc" = 124 ] && why=" (timed out after ${t} s)"
  [ "$rc" != 0 ] && why="$why: $(grep -v '^\s*$' "$OUT/$name.err" | tail -1 | cut -c1-300)"
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s$why" >> "$OUT/status.txt"
}

if [ "$DRY" = 1 ]; then
  echo "install skipped (dry run): would run pip install --no-index --find-links .whl -r bench/requirements-gpu-wheels.txt" \
    >> "$OUT/status.txt"
else
  t0=$(date +%s)
  if [ ! -d .whl ]; then
    echo "install: no .whl/ folder: run bench/fetch_gpu_wheels.sh on a machine with PyPI first" >> "$OUT/status.txt"
  elif ! $PY -m pip install -q --no-index --find-links .whl -r bench/requirements-gpu-wheels.txt \
      > "$OUT/install.log" 2>&1; then
    # a dependency the machine lacks: install the bundle alone and let the import check below name it
    $PY -m pip install -q --no-index --find-links .whl --no-deps -r bench/requirements-gpu-wheels.txt \
      >> "$OUT/install.log" 2>&1
  fi
  if $PY -c "import grain, ml_collections, array_record, tensorboardX" >> "$OUT/install.log" 2>&1; then
    echo "install rc=0 $(( $(date +%s) - t0 )) s" >> "$OUT/status.txt"
  else
    echo "install rc=1 $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/install.log")" >> "$OUT/status.txt"
  fi
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$OUT/status.txt" 2>&1
fi

wanted finetune && step finetune $PY -m bench.finetune "${FT_ARGS[@]}" \
  --set model.attention_implementation=$ATTENTION --profile "$OUT/trace_finetune"
wanted model && step model_jax $PY bench/model.py --frameworks jax --precision bfloat16 --attention $ATTENTION \
  "${MODEL_ARGS[@]}"
wanted model && step model_torch env JAX_PLATFORMS=cpu $PY bench/model.py --frameworks torch --precision bfloat16 \
  "${MODEL_ARGS[@]}"
wanted lafs && step lafs $PY -m bench.pretrain --methods lafs "${LAFS_ARGS[@]}" \
  --set model.attention_implementation=$ATTENTION --profile "$OUT/trace_lafs"
wanted dino && step dino $PY -m bench.pretrain --methods dino "${DINO_ARGS[@]}" \
  --set model.attention_implementation=$ATTENTION
wanted fra && step fra $PY -m bench.pretrain --methods fra --augment-on device "${FRA_ARGS[@]}"

$PY bench/gpu_report.py --lines "$OUT/lines.jsonl" --status "$OUT/status.txt" --results "$RESULTS" \
  --seconds $(( $(date +%s) - START )) $([ "$DRY" = 1 ] && echo --dry-run)
rc=$?
cat "$OUT/status.txt"
exit $rc
