"""The one progress protocol library code reports through; the CLI renders it
(`omgtool.cli.output`), library users pass their own or nothing.

Library functions take `progress: Progress = NULL_PROGRESS` and call `task()` once per
phase, `advance()` as work is done (bytes unless `unit` says otherwise), `note()` for a
one-line message, `close()` at the end of a phase.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def task(self, label: str, total: int | None = None, unit: str = "B") -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing (library default, `--quiet`, `--json`)."""

    def task(self, label: str, total: int | None = None, unit: str = "B") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


NULL_PROGRESS = NullProgress()
