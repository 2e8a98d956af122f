"""Benchmark: merge-lora of a LLaVA-1.5-7B-sized LoRA run (real dims, N layers) into its Vicuna base,
against LLaVA's own way (load_pretrained_model + scripts/merge_lora_weights.py: transformers
LlamaForCausalLM fp16 + mm_projector, non_lora_trainables loaded, PeftModel.from_pretrained,
merge_and_unload, save_pretrained).

    flock /tmp/omgtool-heavy.lock .venv/bin/python -m bench.bench_llava_merge --layers 4 --repeat 3

Inputs are generated under --work (default /tmp/omgtool-llava-bench) and deleted at the end
unless --keep. Prints a markdown block for docs/benchmarks/llava-family.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.measure import machine, measure

BASELINE = r'''
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base, run, out, mm_hidden = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16, low_cpu_mem_usage=True)
h = model.config.hidden_size
model.model.mm_projector = torch.nn.Sequential(torch.nn.Linear(mm_hidden, h), torch.nn.GELU(),
                                               torch.nn.Linear(h, h)).to(torch.float16)
non_lora = torch.load(f"{run}/non_lora_trainables.bin", map_location="cpu", weights_only=True)
non_lora = {(k[11:] if k.startswith("base_model.") else k): v for k, v in non_lora.items()}
if any(k.startswith("model.model.") for k in non_lora):
    non_lora = {(k[6:] if k.startswith("model.") else k): v for k, v in non_lora.items()}
model.load_state_dict(non_lora, strict=False)
model = PeftModel.from_pretrained(model, run).merge_and_unload()
model.save_pretrained(out, max_shard_size="5GB")
'''


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def compare(omg: Path, ref: Path) -> dict:
    """Max |omgtool - baseline| in fp16 ulps over the LoRA-merged weights; projector dtype note."""
    import torch

    from omgtool.formats import open_checkpoint

    a, b = open_checkpoint(omg), open_checkpoint(ref)
    worst, differing, total = 0.0, 0, 0
    for name in a.tensors:
        if "mm_projector" in name or name not in b.tensors:
            continue
        x, y = a.read(name), b.read(name)
        if x.dtype != y.dtype:
            y = y.to(x.dtype)
        if torch.equal(x, y):
            total += x.numel()
            continue
        d = (x.float() - y.float()).abs() / (y.float().abs().clamp_min(1e-4) * torch.finfo(x.dtype).eps)
        worst = max(worst, float(d.max()))
        differing += int((x != y).sum())
        total += x.numel()
    return {"max_ulps": worst, "differing_fraction": differing / max(total, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/tmp/omgtool-llava-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    subprocess.run([py, "-m", "fixtures.llava", "--size", "real", "--layers", str(args.layers), "--out", str(work)],
                   check=True, stdout=subprocess.DEVNULL)
    root = work / "llava15"
    base, run = root / "vicuna-tiny", root / "llava-v1.5-tiny-lora"
    for f in sorted(p for d in (base, run) for p in d.rglob("*") if p.is_file()):  # warm the page cache
        f.read_bytes()
    out_omg, out_ref = work / "merged-omgtool", work / "merged-peft"
    script = work / "baseline.py"
    script.write_text(BASELINE)
    rows = []
    omg_cmd = [str(Path(py).parent / "omgtool"), "merge-lora", str(run), "--base", str(base), "--out", str(out_omg),
               "--force", "--device", "cpu"]
    rows.append(("omgtool merge-lora RUN --base BASE", measure(omg_cmd, repeat=args.repeat), out_omg))
    ref_cmd = [py, str(script), str(base), str(run), str(out_ref), "1024"]
    rows.append(("baseline: LLaVA load_pretrained_model + merge_and_unload + save_pretrained (fp16)",
                 measure(ref_cmd, repeat=args.repeat), out_ref))
    agreement = compare(out_omg, out_ref)
    inputs = _dir_bytes(base) + _dir_bytes(run)
    print(f"## merge-lora, LLaVA-1.5 (real dims, {args.layers} layers)\n")
    print(f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    print(f"- machine: {machine()}")
    print(f"- inputs: Vicuna-7B-shaped base (vocab 32000, hidden 4096, intermediate 11008, {args.layers} layers, "
          f"fp16, {args.layers + 2} shards) + LoRA run (bf16 r=128 alpha=256 on q/k/v/o/gate/up/down, "
          f"non_lora_trainables 1024->4096->4096 projector); {inputs / 1e9:.2f} GB; "
          f"`python -m fixtures.llava --size real --layers {args.layers}`")
    print(f"- command: `flock /tmp/omgtool-heavy.lock .venv/bin/python -m bench.bench_llava_merge --layers "
          f"{args.layers} --repeat {args.repeat}`; median wall of {args.repeat} child processes; peak RSS = max "
          "ru_maxrss; page cache warm\n")
    print("| command | wall (s) | runs (s) | peak RSS (MB) | written (GB) |\n|---|---:|---|---:|---:|")
    for label, m, out in rows:
        print(f"| {label} | {m['wall_s']:.2f} | {', '.join(map(str, m['wall_runs']))} | {m['peak_rss_mb']:.0f} | "
              f"{_dir_bytes(out) / 1e9:.2f} |")
    (a, b) = rows[0][1], rows[1][1]
    print(f"\nomgtool vs baseline: wall {b['wall_s'] / a['wall_s']:.2f}x, peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x "
          f"less. Agreement on the LoRA-merged weights: max {agreement['max_ulps']:.1f} fp16 ulps, "
          f"{100 * agreement['differing_fraction']:.3f}% of elements differ (PEFT upcasts the adapter to float32 on "
          "load, so its CPU merge also rounds once).")
    print(json.dumps({"rows": [(l, m) for l, m, _ in rows], "agreement": agreement, "python": platform.python_version()}),
          file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
