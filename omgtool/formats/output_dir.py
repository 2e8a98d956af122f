"""The atomic output: nothing appears at `--out` until everything succeeded, and nothing a
user cares about is ever replaced.

Rules (the same for every command that writes):
- `--out` may not be, contain, or sit inside any input (`check_not_overlapping`).
- An existing `--out` is refused unless `force`; even with `force` only an empty folder or a
  folder omgtool wrote (an `omgtool-*.json` record inside) is replaced, and for a single-file
  output only a file omgtool wrote (`replaceable`). Anything else is refused, naming what is there.
- One writer per `--out`: a second process fails at once (`OutputLock`, an flock on a
  sibling `.<name>.lock`).
- SIGTERM and SIGHUP unwind like Ctrl-C (`Terminated`), so the temporary folder is removed;
  after a `kill -9`, the next run to the same `--out` removes the leftover `.<name>.partial-*`
  and `.<name>.old-*` siblings and reports them through the note sink.
- Errors inside the temporary folder name the user's `--out`, never the hidden folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from omgtool.errors import InvalidArgument, OmgError

RECORD_GLOB = "omgtool-*.json"
OUTPUT_RECORD = "omgtool-output.json"  # written only when the command wrote no record of its own

# Where notes about the output go (stale partials removed, ...). The CLI points this at its
# renderer; library users get nothing unless they set it.
note_sink: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "omgtool_output_note_sink", default=None)


class OutputFailed(OmgError):
    """Writing the output failed (disk full, permissions); reported against `--out`."""

    exit_code = 2


def _note(text: str) -> None:
    sink = note_sink.get()
    if sink is not None:
        sink(text)


class Terminated(BaseException):
    """SIGTERM / SIGHUP arrived; raised in the main thread so cleanup runs as for Ctrl-C.
    A BaseException (like KeyboardInterrupt) so `except Exception` blocks do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise `Terminated` (once; repeats are ignored while
    cleanup runs). Outside the main thread this does nothing (signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in TERMINATING_SIGNALS}
    if any(isinstance(p, _Raiser) for p in previous.values()):  # already installed further out
        yield
        return
    raiser = _Raiser()
    for s in TERMINATING_SIGNALS:
        signal.signal(s, raiser)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Raiser:
    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame):
        if self.fired:
            return
        self.fired = True
        raise Terminated(signum)


# --- inputs vs output ------------------------------------------------------------------------

def check_not_overlapping(out: str | Path, inputs: Mapping[str, str | Path | None] | Iterable, *,
                          option: str = "--out") -> None:
    """Refuse an output that is, contains, or sits inside an input. `inputs` maps a label
    ("checkpoint", "base", "adapter", "image") to a path; None values are skipped."""
    items = inputs.items() if isinstance(inputs, Mapping) else inputs
    target = Path(out).expanduser().resolve()
    for label, path in items:
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        if target == src:
            raise InvalidArgument(f"{option} {out} is the {label} {path}; choose another output path")
        if src.is_relative_to(target):
            raise InvalidArgument(f"{option} {out} contains the {label} {path}; choose another output path")
        if target.is_relative_to(src):
            raise InvalidArgument(f"{option} {out} is inside the {label} {path}; choose another output path")


# --- what may be replaced --------------------------------------------------------------------

def omgtool_wrote_file(path: Path) -> bool:
    """A single file omgtool wrote: a safetensors file whose metadata names omgtool."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and "omgtool" in meta


def describe_existing(out: Path, *, single_file: bool = False) -> str | None:
    """None when `out` may be replaced under --force; else what is there, in words."""
    if not os.path.lexists(out):
        return None
    if out.is_symlink():
        return f"a symbolic link (to {os.readlink(out)})"
    if single_file:
        if out.is_dir():
            return "a folder"
        if omgtool_wrote_file(out):
            return None
        return "a file omgtool did not write"
    if not out.is_dir():
        return "a file, not an output folder"
    entries = sorted(p.name for p in out.iterdir())
    if not entries or any(out.glob(RECORD_GLOB)):
        return None
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return f"a folder omgtool did not write (it holds {shown}; no {RECORD_GLOB} record)"


def check_replaceable(out: str | Path, force: bool, *, single_file: bool = False, option: str = "--out") -> None:
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not force:
        raise InvalidArgument(f"{option} {out} already exists (use --force to replace it)")
    problem = describe_existing(out, single_file=single_file)
    if problem is not None:
        what = "a file omgtool wrote" if single_file else "an empty folder or a folder omgtool wrote"
        raise InvalidArgument(f"{option} {out} is {problem}; refusing to replace it (--force replaces only {what})")


# --- one writer per output -------------------------------------------------------------------

_held: dict[Path, int] = {}  # lock path -> depth, for re-entry within this process
_held_guard = threading.Lock()


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | Path, *, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock for `out` (re-entrant within one process). A second process
    fails at once with InvalidArgument naming the holder's pid."""
    import fcntl

    out = _absolute(out)
    path = lock_path(out)
    with _held_guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputFailed(f"{option} {out}: cannot write in {out.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_pid(path)
            raise InvalidArgument(f"{option} {out} is being written by another omgtool process"
                                  + (f" (pid {holder})" if holder else "")
                                  + "; wait for it to finish or choose another output") from None
        try:  # the file may have been unlinked by its previous holder between open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    with _held_guard:
        _held[path] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[path]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# --- leftovers of killed runs ----------------------------------------------------------------

def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings a killed run left for `out` (call only while holding its lock)."""
    out = _absolute(out)
    if not out.parent.is_dir():
        return []
    found = [p for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*") for p in out.parent.glob(pattern)]
    return sorted(found)


def remove_stale(out: Path) -> list[tuple[Path, int]]:
    """Remove leftovers of killed runs to `out`; returns (path, bytes) of each, and notes them."""
    from omgtool.sizes import format_size, size_on_disk

    removed = []
    for p in stale_siblings(out):
        try:
            size = size_on_disk(p)
        except OSError:
            size = 0
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append((p, size))
        _note(f"removed {p.name} ({format_size(size)}), left in {p.parent} by an earlier run to {out.name} "
              "that was killed")
    return removed


# --- the atomic folder -----------------------------------------------------------------------

def _absolute(out: str | Path) -> Path:
    # abspath, not resolve: `--out .` must become a real name, but a symlinked parent stays as given
    return Path(os.path.abspath(os.path.expanduser(str(out))))


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, *, inputs: Mapping[str, str | Path | None] | None = None,
                      record: Mapping | None = None, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only when the block succeeds.

    Refuses an `out` that overlaps `inputs`, an existing `out` without `force`, and with
    `force` anything but an empty folder or one omgtool wrote. Holds the output lock for the
    whole block and removes stale partials first. On any failure, SIGTERM/SIGHUP and Ctrl-C
    included, the temporary folder is removed. When the block wrote no `omgtool-*.json`, a
    small `omgtool-output.json` (`record`) marks the folder as omgtool's.
    """
    with _staged(out, force, inputs, option, single_file=False) as (tmp, given, final):
        yield tmp
        if not any(tmp.glob(RECORD_GLOB)):
            from omgtool import __version__

            (tmp / OUTPUT_RECORD).write_text(json.dumps({"omgtool": __version__, **(record or {})},
                                                        indent=2, default=str) + "\n")
        _commit(tmp, final, given, force, option)


@contextlib.contextmanager
def atomic_output_file(out: Path, force: bool = False, *, inputs: Mapping[str, str | Path | None] | None = None,
                       option: str = "--out") -> Iterator[Path]:
    """Like `atomic_output_dir` for one file: yield a temporary sibling folder; the block writes
    `<tmp>/<out.name>`, which is renamed to `out` when the block succeeds. With `force` an
    existing file is replaced only if omgtool wrote it (safetensors metadata names omgtool)."""
    with _staged(out, force, inputs, option, single_file=True) as (tmp, given, final):
        yield tmp
        written = tmp / final.name
        if not written.is_file():
            raise OmgError(f"{given} was not written")
        check_replaceable(given, force, single_file=True, option=option)
        os.replace(written, final)


@contextlib.contextmanager
def _staged(out, force: bool, inputs, option: str, *, single_file: bool) -> Iterator[tuple[Path, Path, Path]]:
    """The checks, the lock, signal handling, stale-partial removal and a fresh partial folder,
    removed again on the way out: (partial folder, `out` as given, `out` absolute)."""
    given = Path(out)
    out = _absolute(out)
    if inputs:
        check_not_overlapping(given, inputs, option=option)
    check_replaceable(given, force, single_file=single_file, option=option)
    with output_lock(out, option=option), terminate_as_exception():
        remove_stale(out)
        tmp = _make_partial(out)
        try:
            with _name_output_in_errors(tmp, given):
                yield tmp, given, out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the block committed a folder


def _make_partial(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output is an ordinary folder
    return tmp


def _commit(tmp: Path, out: Path, given: Path, force: bool, option: str) -> None:
    # Re-check at the end: something may have appeared at `out` while we were writing.
    check_replaceable(given, force, option=option)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash / out.name, out)  # put the old output back
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _name_output_in_errors(tmp: Path, given: Path) -> Iterator[None]:
    """An OSError on a path inside the hidden temporary folder is reported against `--out`."""
    try:
        yield
    except OSError as exc:
        name = getattr(exc, "filename", None)
        if name is None or not Path(os.path.abspath(name)).is_relative_to(tmp):
            raise
        rel = Path(os.path.abspath(name)).relative_to(tmp)
        where = given if str(rel) == "." else given / rel
        raise OutputFailed(f"writing the output failed: {exc.strerror or exc}", where) from exc


# --- free space --------------------------------------------------------------------------------

def check_free_space(folder: Path, needed: int) -> None:
    """Refuse to start when the file system holding `folder` has less than `needed` bytes free."""
    from omgtool.sizes import format_size

    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise InvalidArgument(f"not enough free disk space in {probe}: need {format_size(needed)}, "
                              f"have {format_size(free)}")


@contextlib.contextmanager
def reserve_output(out: str | Path, force: bool = False, *, inputs: Mapping[str, str | Path | None] | None = None,
                   single_file: bool = False, option: str = "--out") -> Iterator[None]:
    """Fail fast, before any heavy work: check `out` against the inputs and the --force rules,
    take its lock for the whole block and clear leftovers of killed runs. `atomic_output_dir`
    inside the block re-enters the same lock."""
    if inputs:
        check_not_overlapping(out, inputs, option=option)
    check_replaceable(out, force, single_file=single_file, option=option)
    with output_lock(out, option=option):
        remove_stale(_absolute(out))
        yield
