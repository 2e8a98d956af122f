#!/usr/bin/env bash
# `make demo`: the main job on the shipped tiny fixtures, end to end.
# inspect -> diff -> merge-lora -> export (llama, peft) -> verify. Output under demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
OMG=".venv/bin/omgtool"
FX=fixtures/tiny
OUT=demo-out
rm -rf "$OUT"
mkdir -p "$OUT"
have() { "$OMG" --help | grep -q " $1 "; }
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$OMG" inspect "$FX/omg_llava_tiny_finetune.pth"
step "$OMG" inspect "$FX/omg_llava_tiny_pretrain.pth" --json --filter 'projector.*' > "$OUT/pretrain.json"
echo "(wrote $OUT/pretrain.json)"
if have diff; then
  step "$OMG" diff "$FX/omg_llava_tiny_pretrain.pth" "$FX/omg_llava_tiny_finetune.pth" --shapes-only || true
fi
if have merge-lora; then
  step "$OMG" merge-lora "$FX/omg_llava_tiny_finetune.pth" --base "$FX/internlm2-chat-tiny" --out "$OUT/merged"
  step "$OMG" inspect "$OUT/merged"
fi
if have export; then
  step "$OMG" export "$OUT/merged" --to llama --out "$OUT/merged-llama"
  step "$OMG" export "$FX/internlm2-chat-tiny" --to llama --out "$OUT/base-llama"
  step "$OMG" export "$FX/omg_llava_tiny_finetune.pth" --to peft --base-llama "$OUT/base-llama" --out "$OUT/adapter"
fi
if have verify; then
  step "$OMG" verify "$OUT/merged" --adapter "$FX/omg_llava_tiny_finetune.pth" --device cpu
fi
printf '\nDemo outputs are in %s/\n' "$OUT"
