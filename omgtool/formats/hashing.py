"""sha256 of files: one function, and a background thread that hashes while other work runs.

Each file gets its own digest (never one digest over several files). hashlib releases the
GIL, so hashing inputs while a merge computes, or each closed shard while the next one is
written, costs little wall time. Files are read through a read-only map whose pages are
dropped once hashed, so memory stays at one block.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any

BLOCK = 64 << 20


class HashingStopped(Exception):
    pass


def sha256_file(path: str | Path, stop: threading.Event | None = None, block: int = BLOCK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for off in range(0, size, block):
                    if stop is not None and stop.is_set():
                        raise HashingStopped(str(path))
                    h.update(view[off:off + block])
                    if hasattr(m, "madvise"):
                        m.madvise(mmap.MADV_DONTNEED, off, min(block, size - off))
            finally:
                view.release()
    return h.hexdigest()


def sha256_files(files: list[str | Path]) -> dict[str, str]:
    """{file name: sha256}, one digest per file."""
    return {Path(f).name: sha256_file(f) for f in files}


class BackgroundHasher:
    """Hash submitted files in order on a daemon thread; `finish()` returns
    {label: {"bytes", "sha256"}}, `cancel()` stops at the next block (failure, Ctrl-C)."""

    def __init__(self):
        self._queue: "queue.Queue[tuple[str, Path] | None]" = queue.Queue()
        self.results: dict[str, dict[str, Any]] = {}
        self.submitted: set[str] = set()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omgtool-hash", daemon=True)
        self._thread.start()

    def submit(self, label: str, path: str | Path) -> None:
        if label in self.submitted:
            return
        self.submitted.add(label)
        self._queue.put((label, Path(path)))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            label, path = job
            try:
                digest = sha256_file(path, self._stop)
                self.results[label] = {"bytes": path.stat().st_size, "sha256": digest}
            except HashingStopped:
                return
            except BaseException as exc:  # re-raised by finish()
                self._error = exc
                return

    def finish(self) -> dict[str, dict[str, Any]]:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.results

    def cancel(self) -> None:
        self._stop.set()
        self._queue.put(None)
