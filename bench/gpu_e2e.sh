#!/usr/bin/env bash
# Real-size end to end on a GPU machine: generate the real OMG-LLaVA structure (random weights),
# merge-lora, verify the merged folder, export to Llama, verify the export, and show that a merge
# with the wrong alpha fails verify (exit 1). Writes the JSON reports and a markdown summary.
#
#   bash bench/gpu_e2e.sh                 # 32 layers (the 7B shapes), results in $RESULTS
#   LAYERS=4 bash bench/gpu_e2e.sh        # a quicker smoke run
#   STEP=verify bash bench/gpu_e2e.sh     # one step only (generate|merge|verify|export|wrong|summary),
#                                         # e.g. to stay under a 10-minute limit per command
#   (generating 32 real-size layers can itself take minutes: run `STEP=generate nohup bash
#   bench/gpu_e2e.sh > gen.log 2>&1 &` and poll for $WORK/omg_llava_7b_finetune_8gpus.pth)
#
# Disk: base 15.5 GB + finetune ~4 GB + merged 15.5 GB + export 15.5 GB at 32 layers; the wrong-alpha
# merge reuses the export's space. Needs ~55 GB free under $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OMG=${OMG:-.venv/bin/omgtool}
LAYERS=${LAYERS:-32}
WORK=${WORK:-/tmp/omgtool-gpu-e2e}
RESULTS=${RESULTS:-${OUT:-bench/results}/verify}
STEP=${STEP:-all}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu LAYERS=1 smoke-tests the script without a GPU
BASE="$WORK/internlm2-chat-7b"
CKPT="$WORK/omg_llava_7b_finetune_8gpus.pth"
mkdir -p "$WORK" "$RESULTS"

want() { [ "$STEP" = all ] || [ "$STEP" = "$1" ]; }
timed() {  # timed NAME CMD... : wall seconds and exit code into $RESULTS/NAME.time
  local name=$1; shift
  local t0 t1 rc
  t0=$EPOCHREALTIME
  set +e; "$@"; rc=$?; set -e
  t1=$EPOCHREALTIME
  echo "{\"step\": \"$name\", \"wall_s\": $(awk "BEGIN{print $t1 - $t0}"), \"rc\": $rc}" > "$RESULTS/$name.time"
  return 0
}

if want generate; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.csv" || true
  if [ ! -f "$CKPT" ]; then
    timed generate "$PY" -m fixtures.generate --size real --layers "$LAYERS" --out "$WORK" \
      --what base,finetune --base-dtype bfloat16 --lora-dtype bfloat16
  fi
fi
if want merge; then
  rm -rf "$WORK/merged"
  timed merge "$OMG" merge-lora "$CKPT" --base "$BASE" --out "$WORK/merged" --device "$DEVICE"
fi
if want verify; then
  timed verify_merged sh -c "\"$OMG\" verify \"$WORK/merged\" --adapter \"$CKPT\" --device "$DEVICE" --json \
    > \"$RESULTS/verify_merged.json\""
fi
if want export; then
  rm -rf "$WORK/llama"
  timed export "$OMG" export "$WORK/merged" --to llama --out "$WORK/llama"
  timed verify_llama sh -c "\"$OMG\" verify \"$WORK/llama\" --adapter \"$CKPT\" --device "$DEVICE" --json \
    > \"$RESULTS/verify_llama.json\""
  rm -rf "$WORK/llama"
fi
if want wrong; then  # a wrong alpha must fail: expect rc 1 in verify_wrong_alpha.time
  rm -rf "$WORK/merged_wrong"
  timed merge_wrong "$OMG" merge-lora "$CKPT" --base "$BASE" --out "$WORK/merged_wrong" --alpha 128 --device "$DEVICE"
  timed verify_wrong_alpha sh -c "\"$OMG\" verify \"$WORK/merged_wrong\" --adapter \"$CKPT\" --device "$DEVICE" \
    --json > \"$RESULTS/verify_wrong_alpha.json\""
  rm -rf "$WORK/merged_wrong"
fi
if want summary; then
  "$PY" -m bench.verify_summary "$RESULTS" | tee "$RESULTS/summary.md"
fi
