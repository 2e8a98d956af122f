#!/usr/bin/env bash
# `make demo`: the main job on the shipped tiny fixtures, end to end:
# inspect -> diff -> merge-lora -> export (llama, peft, safetensors) -> verify.
# Everything lands under demo-out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
OMG=".venv/bin/omgtool"
FX=fixtures/tiny
FT="$FX/omg_llava_tiny_finetune.pth"
OUT=demo-out
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$OMG" inspect "$FT"
step "$OMG" inspect "$FX/omg_llava_tiny_pretrain.pth" --json --manifest "$OUT/pretrain.manifest.json" > "$OUT/pretrain.json"
# diff exits 1 when it finds differences, which is the point here
step "$OMG" diff "$FX/omg_llava_tiny_pretrain.pth" "$FT" || [ $? -eq 1 ]
step "$OMG" diff "$OUT/pretrain.manifest.json" "$FX/omg_llava_tiny_pretrain.pth" --shapes-only
step "$OMG" merge-lora "$FT" --base "$FX/internlm2-chat-tiny" --dry-run
step "$OMG" merge-lora "$FT" --base "$FX/internlm2-chat-tiny" --out "$OUT/merged"
step "$OMG" export "$OUT/merged" --to llama --out "$OUT/merged-llama"
step "$OMG" export "$FX/internlm2-chat-tiny" --to llama --out "$OUT/base-llama"
step "$OMG" export "$FT" --to peft --base-llama "$OUT/base-llama" --out "$OUT/adapter"
step "$OMG" export "$FT" --to safetensors --out "$OUT/finetune.safetensors"
step "$OMG" verify "$OUT/merged" --adapter "$FT" --device cpu
step "$OMG" verify "$OUT/merged-llama" --adapter "$FT" --base "$FX/internlm2-chat-tiny" --device cpu
printf '\nDemo outputs are in %s/\n' "$OUT"
