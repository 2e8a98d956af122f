"""Run a command as a child process and report its wall time and peak RSS.

Each measurement forks a fresh `python -m bench.measure` so RUSAGE_CHILDREN's max RSS
covers exactly one command. Usable as a library (`measure(cmd)`) or a CLI.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _run_one(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "rc": proc.returncode,
            "stderr_tail": proc.stderr.decode(errors="replace")[-500:]}


def measure(cmd: list[str], repeat: int = 3, env: dict | None = None) -> dict:
    """Median wall and max peak RSS over `repeat` runs, each in its own measuring process."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-m", "bench.measure", "--json", "--", *cmd],
                             capture_output=True, text=True, env={**os.environ, **(env or {})},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise RuntimeError(f"measuring {cmd} failed: {out.stderr[-800:]}")
        runs.append(json.loads(out.stdout))
        if runs[-1]["rc"] != 0:
            raise RuntimeError(f"{cmd} exited {runs[-1]['rc']}: {runs[-1]['stderr_tail']}")
    return {"cmd": " ".join(cmd), "wall_s": statistics.median(r["wall_s"] for r in runs),
            "wall_runs": [round(r["wall_s"], 4) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, " \
           f"Python {platform.python_version()}, {platform.platform()}"


if __name__ == "__main__":
    args = sys.argv[1:]
    as_json = args and args[0] == "--json"
    if as_json:
        args = args[1:]
    if args and args[0] == "--":
        args = args[1:]
    result = _run_one(args)
    print(json.dumps(result) if as_json else f"wall {result['wall_s']:.3f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
