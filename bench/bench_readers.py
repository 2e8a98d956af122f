"""Benchmark: hostile inputs under 10 MB stay under 10 s and 200 MB peak RSS.

Builds crafted files (many tensors, a 10 MB safetensors header, a zip of many members,
wide metadata pickles: ints and strings, small strings, floats, a large dict, nested lists;
a deflate bomb, a zero-stride view for --stats) under /tmp and measures `omgtool inspect
--json` (and `--stats` where it applies) on each as a child process, and `omgtool diff
--json` of the wide-metadata file against itself, against the tiny fixture's `inspect
--json` in the same run as the baseline.
Optionally records a long fuzz run. Writes docs/benchmarks/readers.md.

    python -m bench.bench_readers [--fuzz-cases 20000] [--fuzz-seed 1]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.measure import machine, measure

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/omgtool-bench-readers")
OMG = [sys.executable, "-m", "omgtool.cli"]


def _safetensors_big_header(path: Path) -> str:
    names = {f"model.layers.{i}.block.{i % 7}.attention.q_proj.weight": {"dtype": "F32", "shape": [0],
                                                                           "data_offsets": [0, 0]}
             for i in range(110_000)}
    raw = json.dumps(names).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return f"safetensors, {len(names)} empty tensors in a {len(raw) / 1e6:.1f} MB header"


def _zip_many_tensors(path: Path) -> str:
    import torch

    from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

    sd = collections.OrderedDict((f"layer.{i}.weight", tensor_entry("0", torch.FloatStorage, 4, (2, 2)))
                                 for i in range(60_000))
    write_torch_zip(path, data_pkl(sd), {"0": bytes(16)})
    return f"torch zip, {len(sd)} tensors on one storage"


def _zip_many_members(path: Path) -> str:
    import torch

    from tests.ckpt_builders import data_pkl, tensor_entry

    n = 100_000
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl({"w": tensor_entry("0", torch.FloatStorage, 1, (1,))}))
        zf.writestr("archive/data/0", bytes(4))
        for i in range(n):
            zf.writestr(f"archive/x/{i}", b"")
    return f"torch zip with {n} extra members"


def _wide_metadata(path: Path) -> str:
    import torch

    torch.save({"w": torch.ones(2), "history": list(range(1_000_000)), "names": [str(i) for i in range(200_000)]},
               path)
    return "torch zip, 1.2M metadata values"


def _wide_strings(path: Path) -> str:
    import torch

    from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

    names = [f"{i:x}"[-4:] for i in range(1_200_000)]  # distinct objects: no memo (1M is its cap)
    write_torch_zip(path, data_pkl({"w": tensor_entry("0", torch.FloatStorage, 2, (2,)), "names": names},
                                   protocol=4, memo=False), {"0": bytes(8)})
    return "torch zip, 1.2M small strings (no memo)"


def _wide_floats(path: Path) -> str:
    import torch

    torch.save({"w": torch.ones(2), "losses": [i + 0.5 for i in range(1_100_000)]}, path)
    return "torch zip, 1.1M floats"


def _wide_dict(path: Path) -> str:
    import torch

    torch.save({"w": torch.ones(2), "table": {f"k{i}": i for i in range(600_000)}}, path, pickle_protocol=4)
    return "torch zip, a dict of 600k entries"


def _nested_lists(path: Path) -> str:
    import torch

    def chain(leaf):
        for _ in range(95):
            leaf = [leaf]
        return leaf

    torch.save({"w": torch.ones(2), "nested": [chain(i) for i in range(10_000)]}, path)
    return "torch zip, 10,000 lists nested 95 deep"


def _empty_sets(path: Path) -> str:
    from tests.ckpt_builders import write_torch_zip

    # {"m": [set(), set(), ...]}: one opcode byte per 216-byte set (the walker's value budget)
    write_torch_zip(path, b"\x80\x02}q\x00X\x01\x00\x00\x00mq\x01](" + b"\x8f" * 3_900_000 + b"es.", {})
    return "torch zip, 3.9M empty sets"


def _deflate_bomb(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"(" * (1 << 30), compress_type=zipfile.ZIP_DEFLATED)
    return "zip, data.pkl deflated: 1 GiB of MARK"


def _zero_stride(path: Path) -> str:
    import torch

    from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

    write_torch_zip(path, data_pkl({"w": tensor_entry("0", torch.FloatStorage, 1, (2**20, 2**20), stride=(0, 0))}),
                    {"0": struct.pack("<f", 1.0)})
    return "torch zip, one [2**20, 2**20] stride-0 view (--stats)"


CASES = [("big_header.safetensors", _safetensors_big_header, []),
         ("many_tensors.pth", _zip_many_tensors, []),
         ("many_members.pth", _zip_many_members, []),
         ("wide_metadata.pth", _wide_metadata, []),
         ("wide_strings.pth", _wide_strings, []),
         ("wide_floats.pth", _wide_floats, []),
         ("wide_dict.pth", _wide_dict, []),
         ("nested_lists.pth", _nested_lists, []),
         ("empty_sets.pth", _empty_sets, []),
         ("deflate_bomb.pth", _deflate_bomb, []),
         ("zero_stride.pth", _zero_stride, ["--stats"])]
DIFFS = ["wide_metadata.pth"]  # `omgtool diff --json FILE FILE`: both sides walked and summarised


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz-cases", type=int, default=0)
    ap.add_argument("--fuzz-seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "readers.md")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.build:  # in a child: a child's peak RSS starts from its parent's at exec time
        print(json.dumps({name: build(WORK / name) for name, build, _ in CASES}))
        return
    built = subprocess.run([sys.executable, "-m", "bench.bench_readers", "--build"], cwd=ROOT, check=True,
                           capture_output=True, text=True)
    whats = json.loads(built.stdout)
    rows = []
    load0 = os.getloadavg()[0]
    base = measure(OMG + ["inspect", "--json", str(ROOT / "fixtures/tiny/omg_llava_tiny_pretrain.pth")], repeat=3)
    for name, _, extra in CASES:
        path = WORK / name
        what = whats[name]
        m = measure(OMG + ["inspect", "--json", *extra, str(path)], repeat=3, ok_codes=(0, 2, 3))  # 3: refused
        rows.append((what, path.stat().st_size, m))
        print(what, m["wall_s"], m["peak_rss_mb"], m["rc"], file=sys.stderr)
    for name in DIFFS:
        path = WORK / name
        m = measure(OMG + ["diff", "--json", str(path), str(path)], repeat=3, ok_codes=(0, 1))
        rows.append((f"{whats[name]}: `diff --json` against itself", path.stat().st_size, m))
        print(name, "diff", m["wall_s"], m["peak_rss_mb"], m["rc"], file=sys.stderr)
    lines = [
        "## readers: hostile inputs and the fuzz harness",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()} (shared with five other engineers' jobs)",
        "- command: `python -m bench.bench_readers` (each row: median wall of 3 child-process runs of "
        "`omgtool inspect --json FILE`, or `omgtool diff --json FILE FILE` where the row says so, peak RSS = "
        "max ru_maxrss); targets: < 10 s, < 200 MB for any file "
        "under 10 MB",
        "",
        "| input | file size | exit | wall (s) | × baseline wall | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| baseline: tiny OMG-LLaVA pretrain fixture | "
        f"{(ROOT / 'fixtures/tiny/omg_llava_tiny_pretrain.pth').stat().st_size / 1e6:.1f} MB | {base['rc']} | "
        f"{base['wall_s']:.2f} | 1.0 | {base['peak_rss_mb']:.0f} |",
    ]
    for what, size, m in rows:
        lines.append(f"| {what} | {size / 1e6:.1f} MB | {m['rc']} | {m['wall_s']:.2f} | "
                     f"{m['wall_s'] / base['wall_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    lines += ["", f"Load average during the rows: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                  "(other engineers' jobs on the same 2 cores).",
              "The `--stats` row includes importing torch (about 600 MB RSS by itself); the statistics read one "
              "element, since stride-0 dimensions are collapsed exactly. The many-tensor and wide-metadata rows are "
              "dominated by the pickle walk (`formats/pickle_walker.py`, whose opcode/metastack caps are issue 11's); "
              "the header row by family matching and the JSON report of 110,000 tensors."]
    if args.fuzz_cases:
        proc = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--cases", str(args.fuzz_cases), "--seed",
                               str(args.fuzz_seed)], cwd=ROOT, capture_output=True, text=True)
        summary = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
        lines += ["", f"Long fuzz run: `python -m tests.fuzz.run --cases {args.fuzz_cases} --seed {args.fuzz_seed}` "
                      f"(`make fuzz`): {summary['cases']} cases, {summary['commands']} commands (inspect, "
                      f"inspect --json --stats, diff, export --to safetensors; merge-lora --dry-run on the adapter "
                      f"and base-folder seeds), exits {summary['exits']}, "
                      f"**{summary['failures']} failures**, {summary['seconds']} s, slowest command "
                      f"{summary['slowest_s']} s, fuzzer process peak RSS {summary['peak_rss_mb']} MB."]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
