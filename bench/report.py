"""Assemble docs/benchmarks.md from the per-benchmark sections each bench script writes
under docs/benchmarks/ (inspect, diff, merge, export, verify, llava-family).

    python -m bench.report
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["inspect", "diff", "merge", "export", "verify", "llava-family"]
HEADER = """# Benchmarks

Measured figures, one section per benchmark, each with its machine, exact command and date.
Every figure is a ratio against a baseline measured in the same run where the issue asks
for one. Sections are written by the scripts in `bench/` into `docs/benchmarks/<name>.md`
and assembled here by `python -m bench.report`; rerun a script, then the report.

Machine for all CPU runs: the project's 2-core, 24 GiB x86-64 VM, shared with other jobs
while some runs happened (noted per section). No GPU was lent to the sessions that ran
these, so the GPU targets of merge-lora and verify are not yet measured; `bench/gpu_e2e.sh`
is the ready recipe for a GPU machine.
"""


def main() -> None:
    parts = [HEADER]
    folder = ROOT / "docs" / "benchmarks"
    names = ORDER + sorted(p.stem for p in folder.glob("*.md") if p.stem not in ORDER)
    for name in names:
        path = folder / f"{name}.md"
        if path.is_file():
            text = path.read_text().strip()
            if text.startswith("# "):  # demote a top-level title to a section
                text = "#" + text
            parts.append(text)
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
