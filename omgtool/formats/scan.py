"""Scan every pickle stream in a file, whatever its container, before anything decides
what kind of file it is. Raw bytes -> streams -> walker findings; nothing is executed.

Streams found:
- a file that does not start with a zip local header: the pickles from offset 0, one after
  another (a bare pickle of any protocol, several concatenated, or the five pickles of a
  legacy torch file, whose first one may be a payload instead of the magic number);
- zip archives (a torch zip, TorchScript, .npz, or a zip appended to a pickle): every
  member except tensor storages, through both torch's reader (`zip_reader`: what
  torch.load reads) and Python's `zipfile` (what other tools read);
- legacy torch tar files (`storages`, `tensors`, `pickle`, and any other member);
- numpy `.npy` (also inside `.npz`) with object arrays: the pickle after the header;
- bytes/str values that are themselves pickles (the walker's `embedded pickle`).

A stream's opcodes are walked as torch's file-based unpickler reads them; where a FRAME
is overrun (loaders disagree) it is walked as `pickle.loads` reads it as well.
"""

from __future__ import annotations

import ast
import mmap
import re
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from omgtool.errors import Finding, UnreadableInput, UnsafeInput
from omgtool.formats.base import SafetyReport
from omgtool.formats.dtypes import ITEMSIZE
from omgtool.formats.pickle_grades import DANGEROUS, SAFE, UNKNOWN, worst
from omgtool.formats.pickle_walker import MAX_OPCODES, MalformedPickle, StorageType, WalkResult, walk
from omgtool.formats.zip_reader import LOCAL_SIG, ZipError, find_eocd, read_zip

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PICKLES = 5  # magic, protocol, sys_info, data, storage keys; raw storages follow
MAX_STREAMS = 64
MAX_MEMBER_BYTES = 1 << 30
# a compressed member is inflated in memory to be scanned: no more than this (the reader's own
# cap for an inflated data.pkl, formats/torch_file.py); past it the member is "not scanned"
# (unknown), except a .npy whose header says it holds no objects (its data is never a pickle)
MAX_INFLATED_BYTES = 64 << 20
_HEAD_BYTES = 64 << 10
MAX_MEMBERS = 100_000
MAX_NESTING = 2
MAX_FILE_OPCODES = 8_000_000  # every stream of one file together: any file scans in seconds
MAX_ZIPFILE_DIRECTORY = 256 << 20
NOT_A_PICKLE = "not-a-pickle"
_STORAGE_MEMBER = re.compile(r"[^/]*/data/\d+")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Policy:
    allow: frozenset[str] = frozenset()
    refuse: bool = True  # raise UnsafeInput for unknown/dangerous (inspect lists tensors instead)


_POLICY: ContextVar[Policy] = ContextVar("omgtool_scan_policy", default=Policy())


def current_policy() -> Policy:
    return _POLICY.get()


@contextmanager
def scan_policy(allow_globals=None, refuse: bool | None = None):
    """Globals the user trusts (`--allow-global`), and whether readers refuse non-safe files."""
    old = _POLICY.get()
    allow = old.allow if allow_globals is None else frozenset(allow_globals)
    token = _POLICY.set(Policy(allow, old.refuse if refuse is None else refuse))
    try:
        yield _POLICY.get()
    finally:
        _POLICY.reset(token)


@dataclass
class ScanResult:
    path: Path
    kind: str = NOT_A_PICKLE
    findings: list[Finding] = field(default_factory=list)
    globals_seen: set[str] = field(default_factory=set)
    streams: int = 0
    notes: list[str] = field(default_factory=list)
    # the walk of the pickle torch would load (a torch zip's data.pkl, whole, no trusted
    # globals): the reader takes it instead of walking the same bytes again
    main_walk: tuple[str, WalkResult] | None = None

    @property
    def verdict(self) -> str:
        if self.findings:
            return worst(f.grade for f in self.findings)
        return SAFE if self.streams else NOT_A_PICKLE

    @property
    def unsafe(self) -> bool:
        return self.verdict in (UNKNOWN, DANGEROUS)

    def report(self) -> SafetyReport:
        return SafetyReport(verdict=self.verdict, findings=list(self.findings),
                            globals_seen=sorted(self.globals_seen))

    def error(self) -> UnsafeInput:
        note = "TorchScript archive" if self.kind == "torchscript" else ""
        return UnsafeInput(self.path, self.findings, self.verdict, note)


def merge_safety(into: SafetyReport, other: SafetyReport) -> None:
    """Fold `other` (one more file of a folder) into `into`: worst verdict, all findings."""
    if other.verdict == NOT_A_PICKLE:
        return
    into.findings.extend(other.findings)
    into.globals_seen = sorted(set(into.globals_seen) | set(other.globals_seen))
    grades = [g for g in (into.verdict, other.verdict) if g != NOT_A_PICKLE]
    into.verdict = worst(grades)


def scan_file(path: Path, allow=None) -> ScanResult:
    """Scan one file. `allow`: trusted globals (default: the current policy's)."""
    allow = current_policy().allow if allow is None else frozenset(allow)
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            try:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                data = b""
            try:
                return scan_data(data, path, allow)
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UnreadableInput(exc.strerror or str(exc), path) from None


def scan_data(data, path: Path, allow=frozenset()) -> ScanResult:
    scan = _Scan(ScanResult(Path(path)), frozenset(allow))
    scan.container(data, "", 0)
    return scan.result


class _Scan:
    def __init__(self, result: ScanResult, allow: frozenset[str]):
        self.result = result
        self.allow = allow
        self._seen: set[tuple] = set()
        self.budget = MAX_FILE_OPCODES
        self.main_member: str | None = None  # set while torch's own data.pkl is scanned

    # --- bookkeeping ------------------------------------------------------------------
    def absorb(self, walked: WalkResult | None) -> None:
        if walked is None:
            return
        for f in walked.findings:
            key = (f.member, f.offset, f.module, f.name)
            if key not in self._seen:
                self._seen.add(key)
                self.result.findings.append(f)
        self.result.globals_seen |= walked.globals_seen

    def kind(self, kind: str) -> None:
        """The first container found names the file; TorchScript and tar (what torch.load
        would take it for) override a plain pickle."""
        current = self.result.kind
        if current == NOT_A_PICKLE or kind == "torchscript" or kind == "torch-tar" and current == "pickle":
            self.result.kind = kind

    def one(self, data, start: int, member: str) -> WalkResult | None:
        """Walk one pickle from `start`; None if it is malformed (its findings are kept)."""
        if self.budget <= 0:
            self._stopped(member)
            return None
        try:
            walked = walk(data, member, start=start, mode="file", allow=self.allow,
                          max_opcodes=min(self.budget, MAX_OPCODES))
        except MalformedPickle as exc:
            self.budget -= exc.result.opcodes if exc.result is not None else 0
            self.absorb(exc.result)
            if exc.result is not None and exc.result.overrun:
                self._memory(data, start, member)
            return None
        self.budget -= walked.opcodes
        self.absorb(walked)
        self.result.streams += 1
        if member == self.main_member and start == 0 and not self.allow and not walked.overrun:
            self.result.main_walk = (member, walked)
        if walked.overrun:
            self._memory(data, start, member)
        return walked

    def _memory(self, data, start, member) -> None:
        try:
            self.absorb(walk(data, member, start=start, mode="memory", allow=self.allow,
                             max_opcodes=max(1, min(self.budget, MAX_OPCODES))))
        except MalformedPickle as exc:
            self.absorb(exc.result)

    def _stopped(self, member: str) -> None:
        if not any(f.name == "<scan stopped>" and f.opcode == "budget" for f in self.result.findings):
            self.result.findings.append(Finding("", "<scan stopped>", "budget", 0, member, UNKNOWN,
                                                "the file's opcode budget is spent; the rest is unscanned"))

    # --- containers -------------------------------------------------------------------
    def container(self, data, member: str, depth: int) -> None:
        head = bytes(data[:8])
        if head[:4] == LOCAL_SIG:
            self.zip(data, member, depth, primary=True)
            return
        if head[:6] == _NPY_MAGIC:
            self.npy(data, member)
        else:
            self.pickles(data, 0, member)
        if depth == 0 and _looks_tar(data):
            self.tar(data)
        if find_eocd(data) >= 0:  # a zip behind other data: zipfile and numpy read it
            self.zip(data, member, depth, primary=False)

    def pickles(self, data, start: int, member: str) -> None:
        """Concatenated pickles from `start`: all of them for a bare file, five for legacy torch."""
        starts, done, count = [start], set(), 0
        legacy = False
        while starts and count < MAX_STREAMS:
            pos = starts.pop(0)
            if pos >= len(data) or pos in done:
                continue
            done.add(pos)
            walked = self.one(data, pos, member)
            if walked is None:
                return
            count += 1
            if count == 1:
                legacy = walked.value == LEGACY_MAGIC and not member
                self.kind("torch-legacy" if legacy else "pickle")
            if legacy and count >= LEGACY_PICKLES:
                return
            starts.append(walked.end_offset)
            if walked.file_end != walked.end_offset:
                starts.append(walked.file_end)

    def zip(self, data, member: str, depth: int, primary: bool) -> None:
        label = f"{member}:" if member else ""
        scanned: set[int] = set()
        try:
            archive = read_zip(data)
        except ZipError as exc:
            archive = None
            if primary:
                self.result.notes.append(f"torch cannot read this zip ({exc})")
        main = None  # the member torch would unpickle, in the file's own archive
        if archive is not None:
            names = [m.name for m in archive.members]
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                self.kind("torchscript")
                self.result.findings.append(Finding(
                    "", "<TorchScript archive>", "zip", 0, member, UNKNOWN,
                    "torch.load hands TorchScript archives to torch.jit.load, which runs their code/"))
            elif primary:
                try:
                    prefix = archive.prefix
                except ZipError:
                    prefix = ""
                main = archive.locate(prefix + "data.pkl") if prefix else None
                is_torch = main is not None
                is_npz = bool(names) and all(n.endswith(".npy") for n in names)
                self.kind("torch-zip" if is_torch else "npz" if is_npz else "zip")
            for m in archive.members[:MAX_MEMBERS]:
                scanned.add(m.header_offset)
                if _STORAGE_MEMBER.fullmatch(m.name):
                    continue
                is_main = main is not None and m.header_offset == main.header_offset
                try:
                    if m.is_stored:
                        raw = archive.read(m, MAX_MEMBER_BYTES)
                    elif m.size > MAX_INFLATED_BYTES and self._plain_npy(archive.read_prefix(m, _HEAD_BYTES),
                                                                          label + m.name):
                        continue
                    else:
                        raw = archive.read(m, MAX_INFLATED_BYTES)
                except ZipError as exc:
                    if is_main:  # the pickle torch would load, which the reader refuses to inflate too
                        raise UnreadableInput(f"corrupt zip archive ({exc})", self.result.path) from None
                    self._unscanned(label + m.name, str(exc))
                    continue
                self.main_member = label + m.name if is_main and depth == 0 else None
                self.member(raw, label + m.name, depth)
                self.main_member = None
        self._zipfile_view(data, label, depth, scanned)

    def _zipfile_view(self, data, label: str, depth: int, scanned: set[int]) -> None:
        """Members Python's zipfile sees at other offsets (it corrects for prepended data)."""
        eocd = find_eocd(data)
        if eocd < 0 or int.from_bytes(bytes(data[eocd + 12:eocd + 16]), "little") > MAX_ZIPFILE_DIRECTORY:
            return  # zipfile would read a directory this large into memory
        try:
            with zipfile.ZipFile(_BytesReader(data)) as zf:
                infos = zf.infolist()[:MAX_MEMBERS]
                for info in infos:
                    if info.header_offset in scanned or _STORAGE_MEMBER.fullmatch(info.filename):
                        continue
                    name = label + info.filename + " (zipfile view)"
                    limit = MAX_MEMBER_BYTES if info.compress_type == zipfile.ZIP_STORED else MAX_INFLATED_BYTES
                    if info.file_size > MAX_MEMBER_BYTES:
                        self._unscanned(name, "larger than 1 GiB")
                        continue
                    try:
                        if info.file_size > limit:  # zipfile never inflates past the declared size
                            with zf.open(info) as fh:
                                if not self._plain_npy(fh.read(_HEAD_BYTES), name):
                                    self._unscanned(name, f"inflates to {info.file_size} bytes, past {limit}")
                            continue
                        raw = zf.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
                            RuntimeError, zlib.error) as exc:
                        self.result.notes.append(f"zipfile cannot read {info.filename[:80]} ({exc})")
                        continue
                    self.member(raw, name, depth)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error):
            return

    def _plain_npy(self, head: bytes, name: str) -> bool:
        """True when `head` starts a .npy holding no objects: its data is never a pickle."""
        header = _npy_header(head) if head[:6] == _NPY_MAGIC else None
        if header is None or _has_object(header[0]):
            return False
        self.kind("npy")
        return True

    def member(self, raw: bytes, name: str, depth: int) -> None:
        if not raw:
            return
        if raw[:6] == _NPY_MAGIC:
            self.npy(raw, name)
        elif raw[:4] == LOCAL_SIG:
            if depth < MAX_NESTING:
                self.zip(raw, name, depth + 1, primary=False)
        else:
            self.pickles(raw, 0, name)

    def _unscanned(self, name: str, why: str) -> None:
        self.result.findings.append(Finding("", "<member not scanned>", "zip", 0, name, UNKNOWN,
                                            f"member could not be scanned: {why}"))

    def npy(self, data, member: str) -> None:
        header = _npy_header(data)
        if header is None:
            self.result.notes.append(f"{member or 'file'}: unreadable .npy header")
            return
        descr, end = header
        self.kind("npy")
        if _has_object(descr):  # numpy pickles object arrays right after the header
            self.pickles(data, end, member or "npy object array")

    def tar(self, data) -> None:
        try:
            with tarfile.open(fileobj=_BytesReader(data), mode="r:") as tar:
                for info in tar.getmembers()[:MAX_MEMBERS]:
                    if not info.isfile():
                        continue
                    name = f"tar:{info.name}"
                    if info.size > MAX_MEMBER_BYTES:
                        self._unscanned(name, "larger than 1 GiB")
                        continue
                    raw = tar.extractfile(info).read()
                    self.kind("torch-tar")
                    if info.name == "storages":
                        self._tar_records(raw, name, _storage_record)
                    elif info.name == "tensors":
                        self._tar_records(raw, name, _tensor_record)
                    else:
                        self.pickles(raw, 0, name)
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return

    def _tar_records(self, raw: bytes, name: str, skip) -> None:
        """`storages`/`tensors` of a tar-format file: a count, then per record a pickle and raw bytes."""
        first = self.one(raw, 0, name)
        if first is None or not isinstance(first.value, int):
            return
        pos = first.end_offset
        for _ in range(min(first.value, MAX_STREAMS * 1024)):
            walked = self.one(raw, pos, name)
            if walked is None:
                return
            pos = skip(raw, walked)
            if pos is None:
                return
        if pos < len(raw):
            self.one(raw, pos, name)  # storages: the storage views pickle


def _storage_record(raw: bytes, walked: WalkResult) -> int | None:
    args = walked.value
    if not (isinstance(args, tuple) and len(args) == 3 and isinstance(args[2], StorageType)):
        return None
    pos = walked.end_offset
    numel = int.from_bytes(raw[pos:pos + 8], "little", signed=True)
    if numel < 0:
        return None
    return pos + 8 + numel * ITEMSIZE[args[2].dtype]


def _tensor_record(raw: bytes, walked: WalkResult) -> int | None:
    pos = walked.end_offset
    ndim = int.from_bytes(raw[pos:pos + 4], "little", signed=True)
    if not 0 <= ndim <= 64:
        return None
    return pos + 4 + 4 + 16 * ndim + 8


def _npy_header(data) -> tuple[object, int] | None:
    """(descr, where the array data starts) of a .npy, or None when its header is unreadable."""
    head = bytes(data[:12])
    major = head[6] if len(head) > 6 else 0
    if major == 1:
        hlen, hstart = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        hlen, hstart = int.from_bytes(head[8:12], "little"), 12
    else:
        return None
    try:
        header = ast.literal_eval(bytes(data[hstart:hstart + hlen]).decode("latin-1"))
        return header["descr"], hstart + hlen
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        return None


def _has_object(descr) -> bool:
    if isinstance(descr, str):
        return "O" in descr
    if isinstance(descr, (list, tuple)):
        return any(_has_object(d) for d in descr)
    return False


def _looks_tar(data) -> bool:
    """tarfile's own first-header checksum test, without tarfile's cost on non-tar files."""
    if len(data) < 512:
        return False
    block = bytes(data[:512])
    field_ = block[148:156].rstrip(b"\0 ").strip()
    try:
        stored = int(field_, 8) if field_ else -1
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == unsigned


class _BytesReader:
    """A read-only file object over bytes (no copy), for zipfile and tarfile."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out = bytes(self.data[self.pos:end])
        self.pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.data)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True
