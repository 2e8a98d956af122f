"""Benchmark: planning costs what inspect costs. `merge-lora --dry-run` of a full-size
(32-layer, real-width) OMG-LLaVA finetune into InternLM2-chat-7B, and `export --dry-run`,
against `inspect --json` of the same finetune, in the same run.

A plan reads headers only, so the inputs are header-exact and sparse: every tensor name,
shape and dtype of the real files (from fixtures.generate's layout at real size, tensors
built on torch's meta device), the data regions left as holes (os.truncate). That keeps
15 GB + 8 GB of inputs at a few MB on disk; a command that read tensor data would read
zeros, and none of the planned commands does. The finetune is a safetensors file (one of
the generator's containers) so no pickle of 8 GB has to be written.

    .venv/bin/python -m bench.bench_plan [--layers 32] [--repeat 5] [--before DIR]

(--before DIR: `git archive <older commit> omgtool mappings | tar -x -C DIR`, measured on the
same inputs.)

Writes docs/benchmarks/plan.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from bench.measure import machine, measure, write_report

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def _meta_layout():
    """fixtures.generate with every random tensor on the meta device: shapes and dtypes only."""
    import torch

    from fixtures import generate as G

    G._randn = lambda spec, key, shape: torch.empty(tuple(shape), dtype=torch.float32, device="meta")
    return G


def _sparse_safetensors(path: Path, tensors: list[tuple[str, tuple, str]]) -> int:
    from omgtool.formats.dtypes import ITEMSIZE

    header, offset = {}, 0
    for name, shape, dtype in tensors:
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def _entries(items) -> list[tuple[str, tuple, str]]:
    return [(name, tuple(t.shape), DTYPES[str(t.dtype)]) for name, t in items]


def build(work: Path, layers: int) -> tuple[Path, Path]:
    G = _meta_layout()
    spec = G.real(layers, base_dtype="bfloat16", lora_dtype="float32", ckpt_dtype="bfloat16")
    base = work / "internlm2-chat-7b"
    base.mkdir(parents=True)
    entries = _entries(G.base_state_dict(spec))
    half = len(entries) // 2
    weight_map, total = {}, 0
    for i, part in enumerate((entries[:half], entries[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        total += _sparse_safetensors(base / name, part)
        weight_map.update({n: name for n, _, _ in part})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps(G.base_config(spec)))
    # the base tokenizer's size (92544) is all the plan needs of it
    (base / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(spec.vocab_size - 1): {"content": "<|last|>", "special": True}}}))
    ft = work / "omg_llava_7b_finetune_8gpus.safetensors"
    _sparse_safetensors(ft, _entries(G.finetune_state_dict(spec, extra_keys=110).items()))
    return base, ft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/omgtool-bench-plan"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "plan.md")
    ap.add_argument("--before", type=Path, help="a source tree of omgtool before the plan layer (git archive of an "
                    "older commit): its merge-lora --dry-run is measured too, on the same inputs")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    # built in a child: a child's ru_maxrss starts at its parent's peak, so this process stays small
    subprocess.run([sys.executable, "-c", f"from pathlib import Path; from bench.bench_plan import build; "
                    f"build(Path({str(args.workdir)!r}), {args.layers})"], check=True, cwd=ROOT)
    base = args.workdir / "internlm2-chat-7b"
    ft = args.workdir / "omg_llava_7b_finetune_8gpus.safetensors"
    n_base = len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    with open(ft, "rb") as fh:
        n_ft = len(json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0])))
    omg = [sys.executable, "-m", "omgtool.cli"]
    rows = [
        ("omgtool inspect FT --json (baseline)", omg + ["inspect", str(ft), "--json"]),
        ("omgtool merge-lora FT --base BASE --dry-run --json", omg + ["merge-lora", str(ft), "--base", str(base),
                                                                      "--dry-run", "--json"]),
        ("omgtool export BASE --to llama --dry-run --json", omg + ["export", str(base), "--to", "llama", "--out",
                                                                   str(args.workdir / "llama"), "--dry-run", "--json"]),
        ("omgtool export FT --to safetensors --dry-run --json",
         omg + ["export", str(ft), "--to", "safetensors", "--out", str(args.workdir / "ft.safetensors"), "--dry-run",
                "--json"]),
        ("python -c 'import torch' (for scale)", [sys.executable, "-c", "import torch"]),
    ]
    envs = {}
    if args.before:
        label = f"merge-lora --dry-run --json before the plan layer ({args.before.name})"
        rows.append((label, [sys.executable, "-P"] + rows[1][1][1:]))  # -P: the cwd (this tree) not on sys.path
        envs[label] = {"PYTHONPATH": str(args.before.resolve())}
    results = [(label, measure(cmd, args.repeat, env=envs.get(label))) for label, cmd in rows]
    baseline = results[0][1]
    date = datetime.date.today().isoformat()
    lines = ["## plan (--dry-run)", "",
             f"- machine: {machine()}; date {date}",
             f"- inputs: header-exact sparse files of the real structure ({args.layers} layers, real width): an "
             f"InternLM2-chat-7B folder (2 bf16 shards, {n_base} tensors) and the OMG-LLaVA finetune ({n_ft} "
             "tensors, fp32 LoRA r=512, 110 stand-in extra keys) as safetensors",
             f"- command: `.venv/bin/python -m bench.bench_plan --layers {args.layers} --repeat {args.repeat}"
             + (f" --before {args.before}" if args.before else "") + "`; "
             f"each row the median wall of {args.repeat} child-process runs; peak RSS = max ru_maxrss; the 2 cores "
             "were shared with other jobs during the run, so wall times are noisy: CPU s is the steadier figure"]
    if args.before:
        lines.append(f"- the last row runs the tree of commit {args.before.name} (before the plan layer, when "
                     "`merge-lora --dry-run` imported torch to resolve --device) on the same inputs")
    lines += ["",
             "| command | wall s | CPU s | peak RSS MB | wall vs inspect | RSS vs inspect |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in results:
        lines.append(f"| {label} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['wall_s'] / baseline['wall_s']:.2f} | {r['peak_rss_mb'] / baseline['peak_rss_mb']:.2f} |")
    lines.append("")
    write_report(args.out, lines)
    print("\n".join(lines))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
