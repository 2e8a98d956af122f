"""A rich progress bar on stderr implementing omgtool.progress.Progress (task/advance/note/close);
disabled (nothing shown) off a terminal, with --json or --quiet."""

from __future__ import annotations


class StderrBar:
    def __init__(self, label: str, enabled: bool = True):
        self.label = label
        self.enabled = enabled
        self._bar = None
        self._task = None

    def __enter__(self) -> "StderrBar":
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn, TransferSpeedColumn

            from omgtool.cli.output import err

            self._bar = Progress(TextColumn(self.label), TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), transient=True, console=err())
            self._bar.__enter__()
        return self

    def task(self, label: str, total: int | None = None, unit: str = "B") -> None:
        if self._bar is not None:
            self.close()
            self._task = self._bar.add_task("", total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            from rich.markup import escape

            self._bar.console.print(f"[dim]{escape(self.label)}: {escape(text)}[/]")

    def close(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
