#!/usr/bin/env bash
# The accelerator check: every measurement this project reports for an NPU or a CUDA GPU, in one
# run of well under 10 minutes, each result as JSON under one folder.
#
#   bash evaluation/accelerator_check.sh [DEVICE] [RESULTS_DIR]     # DEVICE: npu, cuda, npu:1 ... (default: auto)
#
# Needs a checkpoint (--checkpoint search as everywhere: SVHN_CHECKPOINT, ./checkpoints, ...);
# without one, eval_performance times random weights and the rest stops at test_load.
# Each step's exit status is recorded in RESULTS_DIR/steps.tsv; a failed step does not stop
# the others (a FAIL verdict is a result too).
# Smaller settings for a quick run (the tests run it so on the CPU): SVHN_CHECK_BATCHES,
# SVHN_CHECK_RUNS, SVHN_CHECK_COMPILE=0, SVHN_CHECK_TRAIN_IMAGES, SVHN_CHECK_TRAIN_STEPS.
set -u
cd "$(dirname "$0")/.."
DEVICE="${1:-auto}"
OUT="${2:-results/accelerator-$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-python}"
BATCHES="${SVHN_CHECK_BATCHES:-1 4 8 16 32 64 128 256}"
RUNS="${SVHN_CHECK_RUNS:-30}"
TRAIN_IMAGES="${SVHN_CHECK_TRAIN_IMAGES:-2000}"
TRAIN_STEPS="${SVHN_CHECK_TRAIN_STEPS:-100}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the library without an install, on a bare machine
mkdir -p "$OUT"
: > "$OUT/steps.tsv"

step() {  # step NAME COMMAND...: run, keep its output and exit status
  local name="$1"; shift
  local start=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.txt" | sed 's/^/   /' | tee -a "$OUT/log.txt"
}

"$PY" -c "import svhn, json, torch; from svhn import devices; d = devices.resolve('$DEVICE'); print(json.dumps(devices.environment(d), indent=2))" > "$OUT/environment.json" 2>&1
step test_load          "$PY" test_load.py --device "$DEVICE"
step test_load_bf16     "$PY" test_load.py --device "$DEVICE" --dtype bfloat16
for mode in default strict; do
  step "compare_fp32_$mode" "$PY" inference.py --device "$DEVICE" --fp32-mode "$mode" --compare --json "$OUT/compare-fp32-$mode.json"
done
for dtype in bfloat16 float16; do
  step "compare_$dtype" "$PY" inference.py --device "$DEVICE" --dtype "$dtype" --compare --json "$OUT/compare-$dtype.json"
done
for dtype in float32 bfloat16 float16; do
  step "precision_$dtype" "$PY" evaluation/eval_precision.py --device "$DEVICE" --dtype "$dtype" --json "$OUT/precision-$dtype.json"
done
step precision_fp32_strict "$PY" evaluation/eval_precision.py --device "$DEVICE" --fp32-mode strict --json "$OUT/precision-float32-strict.json"
# the localizer: its checkpoint on the device, find-then-read against the CPU fp32 pipeline, its precision
step test_load_localizer "$PY" test_load.py --network localizer --device "$DEVICE"
for dtype in float32 bfloat16; do
  step "compare_find_$dtype" "$PY" inference.py --find --device "$DEVICE" --dtype "$dtype" --compare --json "$OUT/compare-find-$dtype.json"
  step "precision_localizer_$dtype" "$PY" evaluation/eval_precision.py --network localizer --device "$DEVICE" --dtype "$dtype" --json "$OUT/precision-localizer-$dtype.json"
done
# both networks per batch size, and (eager only) the find-then-read pipeline from the image files
step performance_eager   "$PY" evaluation/eval_performance.py --device "$DEVICE" --batch-sizes $BATCHES --runs "$RUNS" --json "$OUT/performance-eager.json"
step performance_bf16    "$PY" evaluation/eval_performance.py --devices "$DEVICE" --dtype bfloat16 --batch-sizes $BATCHES --runs "$RUNS" --no-pipeline --json "$OUT/performance-bf16.json"
if [ "${SVHN_CHECK_COMPILE:-1}" != 0 ]; then
  step performance_compile "$PY" evaluation/eval_performance.py --devices "$DEVICE" --compile --batch-sizes $BATCHES --runs "$RUNS" --no-pipeline --json "$OUT/performance-compile.json"
fi
for bs in ${SVHN_CHECK_TRAIN_BATCHES:-64 256}; do
  step "train_benchmark_b$bs"      "$PY" train.py --benchmark --device "$DEVICE" --batch-size "$bs" --out "$OUT/train"
  step "train_benchmark_b${bs}_bf16" "$PY" train.py --benchmark --device "$DEVICE" --batch-size "$bs" --amp bf16 --out "$OUT/train"
  step "train_localizer_benchmark_b$bs" "$PY" train.py --task localizer --benchmark --device "$DEVICE" --batch-size "$bs"
done
step train_short "$PY" train.py --synthetic "$TRAIN_IMAGES" --steps "$TRAIN_STEPS" --val-every "$TRAIN_STEPS" --batch-size 64 --device "$DEVICE" --out "$OUT/train-short" --cache "$OUT/cache"
cp "$OUT/train-short/log.jsonl" "$OUT/train-short-log.jsonl" 2>/dev/null
echo "results in $OUT:"; cat "$OUT/steps.tsv"
