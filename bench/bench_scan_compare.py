"""Side by side: detection per class on the project's safety corpus for omgtool, picklescan,
modelscan, fickling and torch.load(weights_only=True). Writes docs/benchmarks/scan-detection.md.

The three scanners are installed from PyPI into a scratch venv under /tmp (never project
dependencies). The corpus is tests/safety_corpus.py's, written under /tmp; every tool runs
on every file in its own child process, and no tool may create a payload's canary file.

    python -m bench.bench_scan_compare [--venv /tmp/omgtool-scanners]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from bench.measure import machine, write_report

ROOT = Path(__file__).resolve().parent.parent
SCANNERS = ["picklescan", "modelscan", "fickling"]
EXTRA = ["typing_extensions"]  # fickling 0.1.12 imports it without declaring it
NOTES = """
Notes:
- fickling 0.1.12 reads PyTorch zip files only when torch is importable; the scratch venv has
  no torch (a second torch install for a comparison was left out), so its zip rows end in
  errors, and its flags on benign files are such errors' exit codes plus flags on legitimate
  torch files scanned as raw pickles.
- torch.load(weights_only=True) is a loader, not a scanner: on the benign bare pickles its
  "flags" are refusals of files that are not torch checkpoints, and on the unknown rows it
  refuses argparse.Namespace / numpy arrays exactly as omgtool grades them.
- modelscan skips files whose extension it does not handle (`.safetensors`, `.npz`, a tar
  named `.pth`) and reports them as errors/skips here.
"""
TORCH_WEIGHTS_ONLY = r"""
import json, pickle, sys, torch
out = {}
for path in sys.argv[1:]:
    try:
        torch.load(path, weights_only=True)
        out[path] = "clean"
    except pickle.UnpicklingError:
        out[path] = "flagged"
    except Exception as exc:
        out[path] = "error"
print(json.dumps(out))
"""


def ensure_venv(venv: Path) -> dict[str, str]:
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *SCANNERS, *EXTRA], check=True,
                   capture_output=True)
    listing = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"], check=True,
                             capture_output=True, text=True).stdout
    versions = {p["name"].lower(): p["version"] for p in json.loads(listing)}
    return {name: versions.get(name, "not installed") for name in SCANNERS}


def outcome(cmd: list[str], cwd: Path, flagged_codes=(1,)) -> str:
    try:  # in a scratch folder: fickling writes safety_results.json into its working directory
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    except subprocess.TimeoutExpired:
        return "error"
    if proc.returncode == 0:
        return "clean"
    if "Traceback" in proc.stderr or proc.returncode not in flagged_codes:
        return "error"
    return "flagged"


def run_tools(venv: Path, folder: Path, names: list[str]) -> dict[str, dict[str, str]]:
    results: dict[str, dict[str, str]] = defaultdict(dict)
    scan = subprocess.run([sys.executable, "-m", "omgtool.cli", "scan", "--json", *[str(folder / n) for n in names]],
                          capture_output=True, text=True, cwd=ROOT)
    for row in map(json.loads, scan.stdout.splitlines()):
        verdict = row["verdict"]
        results["omgtool"][Path(row["path"]).name] = (
            "flagged" if verdict in ("unknown", "dangerous") else "error" if verdict == "unreadable" else "clean")
    bin_ = venv / "bin"
    for name in names:
        path = str(folder / name)
        results["picklescan"][name] = outcome([str(bin_ / "picklescan"), "--path", path], folder.parent)
        results["modelscan"][name] = outcome([str(bin_ / "modelscan"), "-p", path], folder.parent)
        results["fickling"][name] = outcome([str(bin_ / "fickling"), "--check-safety", path], folder.parent)
    torch_out = subprocess.run([sys.executable, "-c", TORCH_WEIGHTS_ONLY, *[str(folder / n) for n in names]],
                               capture_output=True, text=True, cwd=folder)
    for path, value in json.loads(torch_out.stdout).items():
        results["torch.load(weights_only=True)"][Path(path).name] = value
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", type=Path, default=Path("/tmp/omgtool-scanners"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/omgtool-scan-corpus"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "scan-detection.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.safety_corpus import build, prove_live

    versions = ensure_venv(args.venv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    folder, canaries = args.workdir / "corpus", args.workdir / "canaries"
    cases = build(folder, canaries)
    names = [c.name for c in cases]
    results = run_tools(args.venv, folder, names)
    ran = sorted(p.name for p in canaries.iterdir())
    live = prove_live(cases, folder)

    tools = ["omgtool", "picklescan", "modelscan", "fickling", "torch.load(weights_only=True)"]
    groups: dict[str, list] = defaultdict(list)
    for c in cases:
        groups[c.cls if c.loader else f"{c.expect} (no payload)"].append(c)
    lines = [
        "## scan: detection side by side",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- corpus: `tests/safety_corpus.py` ({len(cases)} files: {sum(1 for c in cases if c.loader)} malicious, "
        f"each proven live under its loader in a throw-away subprocess: {sum(live.values())}/{len(live)} live; "
        f"{sum(1 for c in cases if c.expect == 'safe')} benign, "
        f"{sum(1 for c in cases if c.expect == 'unknown')} unknown-but-not-malicious)",
        "- tools: omgtool (`scan --json`: unknown or dangerous = flagged, unreadable = error), "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + " (PyPI, scratch venv `" + str(args.venv) + "`), torch.load(weights_only=True) from the project venv "
          "(UnpicklingError = flagged, any other exception = error)",
        "- cell: flagged / files in the class (`+e` = runs that ended in an error, neither flagged nor clean); "
        "for benign rows a flag is a false alarm",
        f"- command: `python -m bench.bench_scan_compare`; payload canaries created by any tool during the scans: "
        f"{ran or 'none'}",
        "",
        "| class | files | " + " | ".join(tools) + " |",
        "|---|---:|" + "---:|" * len(tools),
    ]
    for cls, members in groups.items():
        cells = []
        for tool in tools:
            got = [results[tool].get(c.name, "error") for c in members]
            errors = got.count("error")
            cells.append(f"{got.count('flagged')}/{len(members)}" + (f" +{errors}e" if errors else ""))
        lines.append(f"| {cls} | {len(members)} | " + " | ".join(cells) + " |")
    malicious = [c for c in cases if c.loader]
    benign = [c for c in cases if c.expect == "safe"]
    totals = []
    for tool in tools:
        hit = sum(results[tool].get(c.name) == "flagged" for c in malicious)
        false = sum(results[tool].get(c.name) == "flagged" for c in benign)
        totals.append(f"{hit}/{len(malicious)} detected, {false}/{len(benign)} false alarms")
    lines.append("| **all** | " + f"{len(cases)} | " + " | ".join(totals) + " |")
    missed = {tool: [c.name for c in malicious if results[tool].get(c.name) != "flagged"] for tool in tools}
    lines += ["", "Missed malicious files per tool:", ""]
    lines += [f"- {tool}: {', '.join(names_) or 'none'}" for tool, names_ in missed.items()]
    lines += NOTES.rstrip("\n").split("\n")
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
