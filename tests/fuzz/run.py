"""Run the structure-aware fuzzer against the CLI, in-process, deterministic by seed.

    python -m tests.fuzz.run --cases 20000 --seed 1 --out /tmp/fuzz-out

Each case copies one seed (tests/fuzz/seeds.py), mutates one of its files 1-3 times
(tests/fuzz/mutate.py) and runs `inspect`, `inspect --json --stats`, `diff SEED CASE`
and `export --to safetensors` on it (`merge-lora --dry-run` for the adapter seed, and
with a mutated base folder as `--base`). The contract checked: exit 0-3, and on exit 2/3
exactly one `error:` line and no traceback; each command under the time limit; the
process's peak RSS never more than the memory limit above its starting peak. A case
that breaks it is kept under --out (input + what happened) to be turned into a
regression file under tests/fuzz/regressions/.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from typer.testing import CliRunner

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_MB = 200


@dataclass
class Failure:
    case: int
    seed_name: str
    mutated: str
    mutations: list[str]
    command: list[str]
    problem: str
    output: str


@dataclass
class Summary:
    cases: int = 0
    commands: int = 0
    exits: dict[int, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    slowest_s: float = 0.0
    peak_rss_mb: float = 0.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _check(result, elapsed: float) -> str | None:
    code = result.exit_code
    if code not in (0, 1, 2, 3):
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            return f"uncaught {type(exc).__name__}: {str(exc)[:200]}"
        return f"exit {code}"
    if "Traceback" in result.output:
        return "traceback in the output"
    if code in (2, 3):
        lines = result.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return f"exit {code} without exactly one error line"
    if elapsed > TIME_LIMIT_S:
        return f"took {elapsed:.1f} s"
    return None


def commands(case: Path, original: Path, out: Path) -> list[list[str]]:
    from tests.fuzz.seeds import ADAPTER_BASE
    from tests.paths import FINETUNE

    if original.name == "internlm2-base":  # a base model folder: what merge-lora reads of it
        return [["inspect", str(case), "--json"],
                ["merge-lora", str(FINETUNE), "--base", str(case), "--dry-run", "--no-hash-base"]]
    cmds = [["inspect", str(case)], ["inspect", str(case), "--json", "--stats"],
            ["diff", str(original), str(case)]]
    if case.is_file():
        cmds.append(["export", str(case), "--to", "safetensors", "--out", str(out), "--force"])
    if original.name == "adapter":
        cmds.append(["merge-lora", str(case), "--base", str(ADAPTER_BASE), "--dry-run", "--no-hash-base"])
    return cmds


def run(cases: int, seed: int, work: Path, out: Path | None = None, progress: bool = False) -> Summary:
    from omgtool.cli import app
    from tests.fuzz.mutate import mutate
    from tests.fuzz.seeds import BASE_SIDE_FILES, build

    runner = CliRunner()
    work.mkdir(parents=True, exist_ok=True)
    seeds = build(work / "seeds")
    summary = Summary()
    start, rss0 = time.perf_counter(), _rss_mb()
    for i in range(cases):
        rng = random.Random(f"{seed}:{i}")  # each case reproducible on its own
        original = rng.choice(seeds)
        case = work / "case" / original.name
        shutil.rmtree(work / "case", ignore_errors=True)
        case.parent.mkdir(parents=True)
        (shutil.copytree if original.is_dir() else shutil.copy)(original, case)
        files = _files(case)
        if original.name == "internlm2-base":
            files = [f for f in files if f.name in BASE_SIDE_FILES] or files
        target = rng.choice(files)
        data, names = target.read_bytes(), []
        for _ in range(rng.choice((1, 1, 2, 3))):
            data, how = mutate(rng, target.name, data)
            names.append(how)
        target.write_bytes(data)
        summary.cases += 1
        for cmd in commands(case, original, work / "export-out.safetensors"):
            t0 = time.perf_counter()
            result = runner.invoke(app, cmd)
            elapsed = time.perf_counter() - t0
            summary.commands += 1
            summary.exits[result.exit_code] = summary.exits.get(result.exit_code, 0) + 1
            summary.slowest_s = max(summary.slowest_s, elapsed)
            problem = _check(result, elapsed)
            grown = _rss_mb() - rss0
            if problem is None and grown > MEMORY_LIMIT_MB:
                problem, rss0 = f"peak RSS grew by {grown:.0f} MB", _rss_mb()
            if problem:
                fail = Failure(i, original.name, str(target.relative_to(case.parent)), names, cmd[:1],
                               problem, (result.stderr or result.output)[-500:])
                summary.failures.append(fail)
                if out is not None:
                    _keep(out, seed, i, case, fail)
        if progress and (i + 1) % 500 == 0:
            print(f"{i + 1} cases, {len(summary.failures)} failures, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_mb = _rss_mb()
    return summary


def _keep(out: Path, seed: int, i: int, case: Path, fail: Failure) -> None:
    dest = out / f"seed{seed}-case{i}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (shutil.copytree if case.is_dir() else shutil.copy)(case, dest / case.name)
    (dest / "failure.json").write_text(json.dumps(fail.__dict__, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/omgtool-fuzz-work"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/omgtool-fuzz-failures"))
    args = ap.parse_args(argv)
    s = run(args.cases, args.seed, args.work, args.out, progress=True)
    print(json.dumps({"cases": s.cases, "commands": s.commands, "exits": s.exits, "failures": len(s.failures),
                      "seconds": round(s.seconds, 1), "slowest_s": round(s.slowest_s, 2),
                      "peak_rss_mb": round(s.peak_rss_mb)}, indent=1))
    for f in s.failures[:50]:
        print(f"case {f.case} ({f.seed_name}: {f.mutated} {'+'.join(f.mutations)}) {f.command[0]}: {f.problem}"
              f" | {f.output.strip()[-160:]}")
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
