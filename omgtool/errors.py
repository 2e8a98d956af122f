"""Typed errors. Each maps to one exit code; the CLI prints them as one `error: ...` line.

Exit codes (documented in README.md):
  0  success / no differences / all checks passed
  1  a result the user asked about is negative: differences found, a check failed,
     an output did not match its plan
  2  unreadable or invalid input, bad arguments, mismatched inputs
  3  unsafe input: a pickle that would run code if loaded
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class OmgError(Exception):
    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def one_line(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return " ".join(text.split())


class CheckFailed(OmgError):
    """A negative answer: differences found, a verification check failed."""

    exit_code = 1


class UnreadableInput(OmgError):
    """Truncated, corrupt or malformed input; a missing file or shard."""

    exit_code = 2


class InvalidArgument(OmgError):
    """Bad option values, unresolvable names, inputs that do not fit together."""

    exit_code = 2


class MismatchError(InvalidArgument):
    """Two inputs disagree (base vs checkpoint shapes, LoRA rank, missing target)."""


@dataclass(frozen=True)
class Finding:
    """One reason a pickle is not safe: what it references, with which opcode, where, how bad.

    grade: "unknown" (outside the allowlist) or "dangerous" (can run code, touch files, import).
    """

    module: str
    name: str
    opcode: str
    offset: int
    member: str = ""
    grade: str = "unknown"
    why: str = ""

    @property
    def target(self) -> str:
        if self.module and self.name:
            return f"{self.module}.{self.name}"
        return self.module or self.name or "?"

    def describe(self) -> str:
        where = f"{self.member}@{self.offset}" if self.member else f"@{self.offset}"
        return f"{self.target} ({self.grade}, {self.opcode} {where})"

    def as_dict(self) -> dict:
        return {"global": self.target, "grade": self.grade, "opcode": self.opcode,
                "member": self.member, "offset": self.offset, "why": self.why}


class UnsafeInput(OmgError):
    """A pickle references something outside the allowlist; it was never executed."""

    exit_code = 3

    def __init__(self, path: str | Path, findings: list[Finding], verdict: str = "", note: str = ""):
        shown = ", ".join(f.describe() for f in findings[:5])
        more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
        verdict = verdict or ("dangerous" if any(f.grade == "dangerous" for f in findings) else "unknown")
        hint = "" if verdict == "dangerous" else " (trust a global with --allow-global MODULE.NAME)"
        note = f"{note}: " if note else ""
        super().__init__(f"refused, unsafe pickle ({note}{verdict}: loading it would run code): "
                         f"{shown}{more}{hint}", path)
        self.findings = findings
        self.verdict = verdict
