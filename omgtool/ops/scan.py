"""Library side of `omgtool scan`: verdicts for many files in one process (no rendering).

Each file costs its pickles, not its tensor bytes: formats/scan.py maps the file and reads
only the zip directory, the pickle members and the pickle streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, UnreadableInput
from omgtool.formats.pickle_grades import DANGEROUS, GRADE_ORDER, SAFE, UNKNOWN, grade_global
from omgtool.formats.scan import NOT_A_PICKLE, scan_file

UNREADABLE = "unreadable"
# Suffixes whose files are expected to hold a pickle: no stream found there means unreadable.
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".tar"}


def check_allowed(names: Iterable[str]) -> frozenset[str]:
    """--allow-global values: MODULE.NAME, and never a dangerous global."""
    out = set()
    for name in names:
        module, _, attr = name.rpartition(".")
        if not module or not attr:
            raise InvalidArgument(f"--allow-global {name!r}: expected MODULE.NAME (e.g. argparse.Namespace)")
        grade, why = grade_global(module, attr)
        if grade == DANGEROUS:
            raise InvalidArgument(f"--allow-global {name}: a dangerous global cannot be allowed ({why})")
        out.add(name)
    return frozenset(out)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files, and every file under folders (recursive, sorted). A HuggingFace cache's blobs
    and the snapshot links to them are one file each (listed by the snapshot name)."""
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            yield path
            continue
        chosen: dict[str, Path] = {}
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                item = Path(root) / name
                if not item.is_file():
                    continue
                real = os.path.realpath(item)
                if real not in chosen or "blobs" in chosen[real].parts:
                    chosen[real] = item
        yield from sorted(chosen.values())


def scan_one(path: Path, allow: frozenset[str]) -> dict[str, Any]:
    try:
        result = scan_file(path, allow)
    except UnreadableInput as exc:
        return {"path": str(path), "verdict": UNREADABLE, "kind": None, "findings": [], "notes": [],
                "error": exc.message}
    except OSError as exc:
        return {"path": str(path), "verdict": UNREADABLE, "kind": None, "findings": [], "notes": [],
                "error": exc.strerror or str(exc)}
    verdict = result.verdict
    error = None
    if verdict == NOT_A_PICKLE:
        verdict = SAFE
        if path.suffix.lower() in PICKLE_SUFFIXES:
            verdict = UNREADABLE
            error = "; ".join(result.notes) or "no readable pickle stream in a file that should hold one"
    findings = sorted((f.as_dict() for f in result.findings), key=lambda f: -GRADE_ORDER[f["grade"]])
    return {"path": str(path), "verdict": verdict, "kind": result.kind, "findings": findings,
            "notes": result.notes, "error": error}


def exit_code(verdicts: Iterable[str]) -> int:
    verdicts = set(verdicts)
    if verdicts & {UNKNOWN, DANGEROUS}:
        return 3
    return 2 if UNREADABLE in verdicts else 0
