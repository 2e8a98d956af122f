"""The one way benchmarks measure a command: run it as a child process and read that
child's own rusage (os.wait4): wall time, CPU time (user + sys), peak RSS.

    measure(cmd, repeat=3)                    # median wall, max peak RSS
    measure(cmd, repeat=2, pick="min")        # fastest run: the least disturbed on a shared machine
    measure(cmd, repeat=3, ok_codes=(0, 1))   # diff exits 1 when it finds differences
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(cmd: list[str], ok_codes=(0,), env: dict | None = None) -> dict:
    with tempfile.TemporaryFile() as errf:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        stderr_tail = errf.read().decode(errors="replace")[-1500:]
    if rc not in ok_codes:
        raise RuntimeError(f"{cmd} exited {rc}: {stderr_tail}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024, "rc": rc}


def measure(cmd: list[str], repeat: int = 3, *, ok_codes=(0,), pick: str = "median",
            env: dict | None = None) -> dict:
    """Wall and CPU time by `pick` ("median" or "min") over `repeat` runs; max peak RSS."""
    runs = [run_once(cmd, ok_codes, env) for _ in range(repeat)]
    choose = {"median": statistics.median, "min": min}[pick]
    return {"cmd": " ".join(cmd), "wall_s": choose(r["wall_s"] for r in runs),
            "cpu_s": choose(r["cpu_s"] for r in runs), "wall_runs": [round(r["wall_s"], 3) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rc": runs[0]["rc"], "runs": runs}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, " \
           f"Python {platform.python_version()}, {platform.platform()}"


def write_report(path: Path, lines: list[str]) -> None:
    """A benchmark's markdown section (docs/benchmarks/*.md; bench.report assembles them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
