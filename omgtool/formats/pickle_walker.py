"""Walk a pickle's opcodes the way CPython's C unpickler reads them; never execute it.

The walker is a stack machine over its own opcode decoder (not `pickletools.genops`),
following `Modules/_pickle.c` where the two differ:

- Reading. `mode="file"` is how the C unpickler reads a file object without `peek` (torch.load's
  `io.BytesIO` of `data.pkl`): FRAME pre-reads its bytes into a buffer, and an argument
  that overruns the buffer makes the C unpickler throw the rest of the frame away and
  read fresh bytes after it (counted BINBYTES/BYTEARRAY8 data is the exception: it is
  copied across). `mode="memory"` is how it reads one bytes buffer (loads).
  Either way an overrun is recorded (`WalkResult.overrun`): no pickler writes one, and
  loaders disagree on what follows it, so scanners walk both modes and flag it.
- STOP returns the top of the stack (extra items are ignored), POP with an empty
  segment pops the MARK, MEMOIZE keys are the memo's size, PUT/DUP/MEMOIZE need an item
  above the mark, PROTO may appear anywhere and sets the protocol (protocol < 3 renames
  Python 2 globals, as fix_imports does), GLOBAL lines must end in a newline.

Allowlisted globals become inert stand-ins (a tensor rebuild becomes a `TensorRef`);
every other global is a graded `Finding` (`pickle_grades`) and its results are
`Refused` stand-ins, so the walk goes on and tensors are still listed. A stream that
turns malformed keeps the findings made before (`MalformedPickle.result`).

Remaining difference: with `peek` (a buffered file, e.g. a legacy `.pth` opened by path)
the C unpickler's frame handling depends on the file object's buffer state; the two modes
bracket it, and any overrun is itself a dangerous finding.
"""

from __future__ import annotations

import codecs
import io
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from omgtool.errors import Finding
from omgtool.formats.dtypes import STORAGE_DTYPES, TORCH_DTYPE_NAMES
from omgtool.formats.pickle_grades import DANGEROUS, SAFE, UNKNOWN, compat_name, grade_global

# Resource caps: any input finishes in seconds with bounded memory.
MAX_OPCODES = 4_000_000  # one stream; formats/scan.py also caps the total per file
MAX_EMBEDDED_OPCODES = 1_000_000  # all embedded pickles of one stream together
MAX_STACK = 1_000_000
MAX_MARKS = 100_000
MAX_MEMO = 1_000_000
MAX_LONG_BYTES = 1 << 16
MAX_EMBEDDED_DEPTH = 2
MAX_VALUE_DEPTH = 100  # deeper structure is summarised as an Opaque in the returned value
MAX_INLINE_BYTES = 64 << 20  # longer bytes/str arguments are stepped over, not copied
# containers and call results built, by their rough CPython size (an empty set is 216 bytes
# from one opcode byte): at most this many bytes, or 8x the pickle's own size if that is more
MAX_BUILT_BYTES = 96 << 20
HIGHEST_PROTOCOL = 5


class MalformedPickle(Exception):
    """The byte stream is not a pickle the C unpickler would finish; `result` keeps findings."""

    def __init__(self, message: str, result: "WalkResult | None" = None):
        super().__init__(message)
        self.result = result


class _LimitReached(MalformedPickle):
    pass


@dataclass(frozen=True, slots=True)
class StorageRef:
    dtype: str
    key: str
    location: str
    numel: int
    extra: tuple = ()  # persistent-id fields past the 5th (legacy files: view_metadata)


@dataclass(frozen=True, slots=True)
class TensorRef:
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False, slots=True)
class Opaque:
    """Inert stand-in for an allowlisted non-tensor object (a device, a numpy scalar)."""

    what: str

    def __repr__(self) -> str:
        return f"<{self.what}>"


@dataclass(eq=False, slots=True)
class Refused:
    """Stand-in for anything built from a non-safe global; already reported.

    origin: "global" (the global itself) or "call" (what calling it returned)."""

    what: str
    origin: str = "global"

    def __repr__(self) -> str:
        return f"<refused {self.what}>"


class StateDict(dict):
    """collections.OrderedDict stand-in; keeps BUILD state (e.g. `_metadata`) aside."""

    __slots__ = ("attrs",)

    def __init__(self, *args):
        super().__init__(*args)
        self.attrs: dict = {}


class _IdKey:
    """A dict key or set member that is not a plain scalar: hashed by identity, so hostile
    nesting never reaches CPython's recursive tuple hash."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)[:80]


class IdentitySet:
    """Objects by identity, as a bitmap over their addresses: 8 KiB per MiB of heap that holds a
    member, instead of an int object and a hash slot per member (a million containers cost
    tens of megabytes as a `set` of ids). Every live object spans at least 16 bytes, so
    `id >> 4` tells live objects apart; members must stay alive while the set is used."""

    __slots__ = ("_pages",)

    def __init__(self):
        self._pages: dict[int, bytearray] = {}

    def add(self, obj) -> bool:
        """Add `obj`; True when it was already a member."""
        slot = id(obj) >> 4
        page = self._pages.get(slot >> 16)
        if page is None:
            page = self._pages[slot >> 16] = bytearray(8192)
        byte, bit = (slot & 0xFFFF) >> 3, 1 << (slot & 7)
        if page[byte] & bit:
            return True
        page[byte] |= bit
        return False

    def discard(self, obj) -> None:
        slot = id(obj) >> 4
        page = self._pages.get(slot >> 16)
        if page is not None:
            page[(slot & 0xFFFF) >> 3] &= ~(1 << (slot & 7)) & 0xFF

    def __contains__(self, obj) -> bool:
        slot = id(obj) >> 4
        page = self._pages.get(slot >> 16)
        return page is not None and bool(page[(slot & 0xFFFF) >> 3] & (1 << (slot & 7)))


class _Memo:
    """The unpickler's memo: a list for the keys 0..n-1 that picklers write (PUT n in order,
    MEMOIZE), a dict for any other key. 8 bytes per entry, not a dict slot and an int key."""

    __slots__ = ("dense", "sparse")

    def __init__(self):
        self.dense: list = []
        self.sparse: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dense) + len(self.sparse)

    def __contains__(self, key: int) -> bool:
        return 0 <= key < len(self.dense) or key in self.sparse

    def __getitem__(self, key: int):
        if 0 <= key < len(self.dense):
            return self.dense[key]
        return self.sparse[key]

    def __setitem__(self, key: int, value) -> None:
        dense = self.dense
        if key < len(dense):
            dense[key] = value
        elif key == len(dense):
            dense.append(value)
            sparse = self.sparse
            while sparse and len(dense) in sparse:  # keys put ahead of order join the list
                dense.append(sparse.pop(len(dense)))
        else:
            self.sparse[key] = value


@dataclass(frozen=True, slots=True)
class StorageType:
    dtype: str


class _TypeMarker:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        return Opaque(self.name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if isinstance(storage, (Refused, Opaque)):
        return Refused("tensor on a refused storage", "call")
    if not isinstance(storage, StorageRef):
        raise MalformedPickle("tensor rebuild without a storage persistent id")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if isinstance(func, (Refused, Opaque)):
        return Refused("_rebuild_from_type_v2 of a refused function", "call")
    if func not in _CALLABLE_STUBS:
        raise MalformedPickle("_rebuild_from_type_v2 with a function outside the allowlist")
    if not isinstance(args, tuple):
        raise MalformedPickle("_rebuild_from_type_v2 without an argument tuple")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise MalformedPickle("_codecs.encode with unexpected arguments")
    return text.encode(encoding, "surrogatepass")


def _ordered_dict(*args):
    if args and isinstance(args[0], (list, tuple)):
        out = StateDict()
        for item in args[0]:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                out[_key(item[0])] = item[1]
        return out
    return StateDict()


def _set(*args):
    return {_key(x) for x in (args[0] if args and isinstance(args[0], (list, tuple, set, frozenset)) else ())}


def _bytes(*args):
    if args and not isinstance(args[0], (bytes, bytearray, list)):
        raise MalformedPickle("bytes() of an unexpected value")
    return bytes(args[0]) if args else b""


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(x, (int, float)) for x in (real, imag)):
        raise MalformedPickle("complex() with non-numbers")
    return complex(real, imag)


def _frozenset(*args):
    return frozenset(_set(*args))


_CALLABLE_STUBS = {
    _rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter, _rebuild_from_type_v2,
    _codecs_encode, _ordered_dict, _set, _frozenset, _complex, _bytes,
}

# (module, name) -> inert stand-in, for the globals `pickle_grades` calls safe. A safe global
# without an entry here becomes an opaque stub named after it.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("collections", "Counter"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "complex"): _complex,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): lambda *a: bytearray(a[0]) if a and isinstance(a[0], (bytes, bytearray)) else bytearray(),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): lambda *a: tuple(a[0]) if a and isinstance(a[0], (list, tuple)) else (),
    ("torch", "device"): Opaque("torch.device"),
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    ("numpy.core.multiarray", "scalar"): Opaque("numpy scalar"),
    ("numpy._core.multiarray", "scalar"): Opaque("numpy scalar"),
    ("numpy", "dtype"): Opaque("numpy.dtype"),
}
for _name, _dtype in STORAGE_DTYPES.items():
    ALLOWED_GLOBALS[("torch", _name)] = StorageType(_dtype)
for _name in TORCH_DTYPE_NAMES:
    ALLOWED_GLOBALS[("torch", _name)] = Opaque(f"torch.{_name}")


@dataclass
class WalkResult:
    value: Any
    findings: list[Finding] = field(default_factory=list)
    globals_seen: set[str] = field(default_factory=set)
    end_offset: int = 0  # just past STOP
    file_end: int = 0  # where the C unpickler leaves a non-peek file (a frame's end, if STOP sat inside)
    overrun: bool = False
    protocol: int = 0
    opcodes: int = 0


_MARK = object()
_SCALAR_KEYS = (str, int, float, bool, bytes, type(None))


def _key(value):
    if isinstance(value, _SCALAR_KEYS):
        return value
    if isinstance(value, tuple) and all(isinstance(v, _SCALAR_KEYS) for v in value):
        return value
    return _IdKey(value)


class _Source:
    """The C unpickler's input buffer over `data` (bytes or mmap), from `start`."""

    def __init__(self, data, start: int, mode: str):
        self.data = data
        self.size = len(data)
        self.file_mode = mode == "file"
        self.bs = start  # buffer start (file offset)
        self.bl = 0  # buffer length
        self.idx = 0  # next byte in the buffer
        self.fpos = start  # file position (file mode)
        self.overrun = False
        if not self.file_mode:
            self.bl = self.size - start

    @property
    def pos(self) -> int:
        return self.bs + self.idx

    def _truncated(self):
        raise MalformedPickle("pickle data was truncated")

    def read(self, n: int, copy: bool = True) -> bytes:
        if n < 0:
            raise MalformedPickle("negative length")
        if self.idx + n <= self.bl:
            start = self.bs + self.idx
            self.idx += n
            return self.data[start:start + n] if copy else b""
        if not self.file_mode:
            self._truncated()
        if self.idx < self.bl:  # the C unpickler drops the rest of its buffer here
            self.overrun = True
        if self.fpos + n > self.size:
            self._truncated()
        self.bs, self.bl, self.idx = self.fpos, n, n
        self.fpos += n
        return self.data[self.bs:self.bs + n] if copy else b""

    def read_counted(self, n: int, copy: bool = True) -> bytes:
        """BINBYTES/BYTEARRAY8 data: buffered part, then the file (contiguous in both modes)."""
        if n < 0:
            raise MalformedPickle("negative length")
        if self.idx + n <= self.bl:
            return self.read(n, copy)
        if not self.file_mode:
            self._truncated()
        have = self.bl - self.idx
        start = self.bs + self.idx
        if self.fpos + (n - have) > self.size:
            self._truncated()
        self.fpos += n - have
        self.bs, self.bl, self.idx = self.fpos, 0, 0
        return self.data[start:start + n] if copy else b""

    def readline(self) -> bytes:
        start = self.bs + self.idx
        end = self.data.find(b"\n", start, self.bs + self.bl)
        if end >= 0:
            self.idx = end + 1 - self.bs
            return self.data[start:end + 1]
        if not self.file_mode:
            raise MalformedPickle("pickle data was truncated (no newline)")
        if self.idx < self.bl:
            self.overrun = True
        end = self.data.find(b"\n", self.fpos)
        if end < 0:
            raise MalformedPickle("pickle data was truncated (no newline)")
        self.bs, self.bl = self.fpos, end + 1 - self.fpos
        self.idx = self.bl
        self.fpos = end + 1
        return self.data[self.bs:end + 1]

    def frame(self, length: int) -> None:
        if length < 0 or length > self.size:
            raise MalformedPickle("FRAME length exceeds the data")
        if not self.file_mode:
            if self.idx + length > self.bl:
                self._truncated()
            return
        self.read(length)
        self.idx -= length

    def file_end(self) -> int:
        return self.fpos if self.file_mode else self.pos


def walk(stream: BinaryIO | bytes, member: str = "", *, start: int = 0, mode: str = "file",
         allow: frozenset[str] | set[str] = frozenset(), max_opcodes: int = MAX_OPCODES,
         _depth: int = 0) -> WalkResult:
    """Interpret one pickle (up to its STOP) without executing anything.

    `stream`: bytes/mmap (walked from `start`), or a binary file, walked from its position
    and left just past STOP. `allow`: `module.name` globals the user trusts (accepted only
    when graded unknown). Raises MalformedPickle (with the findings so far) on bad input.
    """
    fh = None
    base = 0
    if hasattr(stream, "read") and not isinstance(stream, mmap.mmap):
        fh = stream
        start = fh.tell()
        if isinstance(fh, io.BytesIO):
            data = fh.getvalue()
        else:
            try:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                data, base, start = fh.read(), start, 0
    else:
        data = stream
    machine = _Machine(data, start, mode, member, frozenset(allow), _depth, max_opcodes)
    try:
        result = machine.run()
    finally:
        if fh is not None:
            fh.seek(base + (machine.result.end_offset or machine.src.pos))
            if isinstance(data, mmap.mmap):
                data.close()  # the walked value holds copies, never views of the map
    return result


class _Machine:
    def __init__(self, data, start, mode, member, allow, depth, max_opcodes=MAX_OPCODES):
        self.data = data
        self.src = _Source(data, start, mode)
        self.member = member
        self.allow = allow
        self.depth = depth
        self.max_opcodes = max_opcodes
        self.embedded_budget = MAX_EMBEDDED_OPCODES
        self.built = 0  # estimated bytes of the containers and call results built so far
        self.max_built = max(MAX_BUILT_BYTES, 8 * len(data))
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo = _Memo()
        self.proto = 0
        self.result = WalkResult(value=None)
        self.op_pos = start

    # --- findings -------------------------------------------------------------------
    def finding(self, module, name, grade, why, op=None, pos=None):
        self.result.findings.append(Finding(module, name, op or self.op_name, self.op_pos if pos is None else pos,
                                            self.member, grade, why))

    def resolve(self, module: str, name: str):
        if self.proto < 3:
            module, name = compat_name(module, name)
        full = f"{module}.{name}"
        self.result.globals_seen.add(full)
        grade, why = grade_global(module, name)
        if grade == SAFE:
            stub = ALLOWED_GLOBALS.get((module, name))
            return Opaque(full) if stub is None else stub
        if grade == UNKNOWN and full in self.allow:
            return Opaque(f"{full} (allowed)")
        self.finding(module, name, grade, why)
        return Refused(full)

    def embedded(self, value) -> None:
        """A bytes/str value that is itself a pickle with non-safe globals is a finding."""
        if self.depth >= MAX_EMBEDDED_DEPTH or len(value) < 4 or self.embedded_budget <= 0:
            return
        if isinstance(value, str):
            if value[0] not in "\x80c(":
                return
            try:
                value = value.encode("latin-1")
            except UnicodeEncodeError:
                return
        head = value[0]
        if not ((head == 0x80 and value[1] <= HIGHEST_PROTOCOL) or (head in b"c(" and b"\n" in value[:512])):
            return
        findings = []
        for mode in ("file", "memory"):
            try:
                inner = walk(value, self.member, mode=mode, allow=self.allow, _depth=self.depth + 1,
                             max_opcodes=self.embedded_budget)
            except MalformedPickle as exc:
                inner = exc.result
            self.embedded_budget -= inner.opcodes if inner is not None else 0
            if inner is not None:
                findings.extend(inner.findings)
                if not inner.overrun:
                    break
        for f in findings:
            self.finding(f.module, f.name, f.grade, f"embedded pickle: {f.why}")

    # --- stack helpers --------------------------------------------------------------
    def pop(self):
        if not self.stack:
            raise MalformedPickle("unpickling stack underflow")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise MalformedPickle("unpickling stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise MalformedPickle("could not find MARK")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def push(self, value):
        if len(self.stack) >= MAX_STACK:
            raise _LimitReached("stack size limit")
        self.stack.append(value)

    def push_built(self, value, cost: int):
        """push a new container or call result of about `cost` bytes, within the budget."""
        self.built += cost
        if self.built > self.max_built:
            raise _LimitReached(f"more than {self.max_built >> 20} MiB of values built")
        self.push(value)

    def push_text(self, value):
        self.push(value)
        if value and isinstance(value, (bytes, str)):
            self.embedded(value)

    # --- calls ------------------------------------------------------------------------
    def call(self, func, args: tuple, kwargs=None):
        if isinstance(func, Refused):
            if func.origin == "call":
                self.finding("", f"<result of {func.what}>", DANGEROUS,
                             "calls an unknown callable (the result of another call)")
            return Refused(func.what, "call")
        if isinstance(func, Opaque):
            return Opaque(func.what)
        if isinstance(func, _TypeMarker) or callable(func) and not isinstance(func, type) and func in _STUB_SET:
            try:
                out = func(*args, **(kwargs or {}))
            except MalformedPickle:
                raise
            except Exception as exc:  # a stub rejected its arguments
                raise MalformedPickle(f"{self.op_name}: bad arguments ({type(exc).__name__})") from None
            if isinstance(out, (bytes, bytearray)) and out:
                self.embedded(bytes(out))
            return out
        raise MalformedPickle(f"{self.op_name} on a {type(func).__name__}, which is not callable")

    # --- the loop --------------------------------------------------------------------
    def run(self) -> WalkResult:
        src = self.src
        table = _DISPATCH
        count = 0
        memo_dense, memo_sparse = self.memo.dense, self.memo.sparse
        try:
            while True:
                idx = src.idx
                self.op_pos = src.bs + idx
                if idx < src.bl:  # the opcode byte from the buffer (the hot path)
                    code = self.data[self.op_pos]
                    src.idx = idx + 1
                else:
                    code = src.read(1)[0]
                entry = table.get(code)
                if entry is None:
                    raise MalformedPickle(f"invalid load key {bytes([code])!r} at {self.op_pos}")
                self.op_name, handler = entry
                count += 1
                if count > self.max_opcodes or len(memo_dense) + len(memo_sparse) > MAX_MEMO:
                    self.result.opcodes = count
                    raise _LimitReached("opcode or memo limit")
                if handler is None:  # STOP
                    self.result.opcodes = count
                    value = self.pop()
                    self.result.value = _sanitize(value)
                    self.result.end_offset = src.pos
                    self.result.file_end = src.file_end()
                    self._note_overrun()
                    self.result.protocol = self.proto
                    return self.result
                handler(self)
        except _LimitReached as exc:
            self.finding("", "<scan stopped>", UNKNOWN, f"resource limit reached ({exc}); the rest is unscanned")
            return self._fail(exc)
        except MalformedPickle as exc:
            self.result.opcodes = count
            return self._fail(exc)
        except (IndexError, KeyError, TypeError, AttributeError, ValueError, OverflowError,
                UnicodeDecodeError, struct.error, RecursionError, MemoryError) as exc:
            return self._fail(MalformedPickle(f"malformed pickle ({type(exc).__name__}) at {self.op_pos}"))

    def _note_overrun(self) -> None:
        if self.src.overrun and not self.result.overrun:
            self.result.overrun = True
            self.finding("", "<FRAME overrun>", DANGEROUS,
                         "an opcode argument overruns its FRAME: the C unpickler reads different "
                         "bytes from a file than pickletools and pickle.loads do", op="FRAME")

    def _fail(self, exc: MalformedPickle):
        self._note_overrun()
        self.result.end_offset = 0
        raise MalformedPickle(str(exc), self.result) from None

    # --- argument readers -------------------------------------------------------------
    def _u(self, n):
        return int.from_bytes(self.src.read(n), "little")

    def _line(self) -> bytes:
        line = self.src.readline()
        if len(line) < 2 and self.op_name not in ("INT", "LONG", "FLOAT"):
            raise MalformedPickle("pickle exhausted before end of line")
        return line[:-1]


def _op_int(m):
    line = m.src.readline()[:-1]
    if len(line) == 2 and line[:1] == b"0" and line[1:] in (b"0", b"1"):
        m.push(line == b"01")
    else:
        try:
            m.push(int(line, 10))
        except ValueError:
            m.push(int(line, 0))


def _op_long(m):
    line = m.src.readline()[:-1]
    if line.endswith(b"L"):
        line = line[:-1]
    m.push(int(line, 10))


def _long_from(m, raw):
    m.push(int.from_bytes(raw, "little", signed=True))


def _op_long4(m):
    n = int.from_bytes(m.src.read(4), "little", signed=True)
    if n < 0:
        raise MalformedPickle("LONG pickle has negative byte count")
    if n > MAX_LONG_BYTES:
        raise _LimitReached("LONG4 size limit")
    _long_from(m, m.src.read(n))


def _op_string(m):
    line = m._line()
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise MalformedPickle("the STRING opcode argument must be quoted")
    m.push_text(codecs.escape_decode(line[1:-1])[0].decode("latin-1"))


def _op_binstring(m, n):
    m.push_text(m.src.read(n).decode("latin-1"))


def _op_unicode(m):
    m.push_text(m.src.readline()[:-1].decode("raw-unicode-escape"))


def _op_binunicode(m, n):
    if n > MAX_INLINE_BYTES:
        m.src.read(n, copy=False)
        m.push(Opaque(f"str of {n} bytes"))
        return
    m.push_text(str(m.src.read(n), "utf-8", "surrogatepass"))


def _op_binbytes(m, nbytes):
    n = m._u(nbytes)
    if n > MAX_INLINE_BYTES:
        m.src.read_counted(n, copy=False)
        m.push(Opaque(f"bytes of {n} bytes"))
        return
    m.push_text(m.src.read_counted(n))


def _op_bytearray8(m):
    n = m._u(8)
    if n > MAX_INLINE_BYTES:
        m.src.read_counted(n, copy=False)
        m.push(Opaque(f"bytearray of {n} bytes"))
        return
    m.push(bytearray(m.src.read_counted(n)))


def _op_dict(m):
    items = m.pop_mark()
    if len(items) % 2:
        raise MalformedPickle("odd number of items for DICT")
    m.push_built({_key(k): v for k, v in zip(items[::2], items[1::2])}, 64 + 20 * len(items))


def _op_tuple_n(n):
    def op(m):
        if len(m.stack) < n:
            raise MalformedPickle("unpickling stack underflow")
        items = tuple(m.stack[len(m.stack) - n:]) if n else ()
        del m.stack[len(m.stack) - n:]
        m.push_built(items, 40 + 8 * n)
    return op


def _op_tuple(m):
    items = m.pop_mark()
    m.push_built(tuple(items), 40 + 8 * len(items))


def _op_list(m):
    items = m.pop_mark()
    m.push_built(items, 56 + 8 * len(items))


def _op_mark(m):
    if len(m.metastack) >= MAX_MARKS:
        raise _LimitReached("MARK limit")
    m.metastack.append(m.stack)
    m.stack = []


def _op_pop(m):
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _op_put(m, key):
    if key < 0:
        raise MalformedPickle("negative PUT argument")
    dense = m.memo.dense
    if key == len(dense) and not m.memo.sparse:  # what picklers write: the next key
        dense.append(m.top())
    else:
        m.memo[key] = m.top()


def _op_get(m, key):
    dense = m.memo.dense
    if 0 <= key < len(dense):
        m.push(dense[key])
        return
    if key not in m.memo.sparse:
        raise MalformedPickle(f"memo value not found at index {key}")
    m.push(m.memo.sparse[key])


def _append_to(m, target, items):
    if isinstance(target, (Refused, Opaque)):
        return
    if not isinstance(target, list):
        raise MalformedPickle(f"{m.op_name} on a {type(target).__name__}")
    target.extend(items)


def _op_append(m):
    value = m.pop()
    _append_to(m, m.top(), [value])


def _op_appends(m):
    items = m.pop_mark()
    if items:
        _append_to(m, m.top(), items)


def _set_items(m, target, items):
    if len(items) % 2:
        raise MalformedPickle("odd number of items for SETITEMS")
    if isinstance(target, (Refused, Opaque)):
        return
    if isinstance(target, dict):
        for k, v in zip(items[::2], items[1::2]):
            target[_key(k)] = v
        return
    if isinstance(target, list):
        for k, v in zip(items[::2], items[1::2]):
            target[k] = v  # list.__setitem__: an int index in range, else malformed
        return
    raise MalformedPickle(f"{m.op_name} on a {type(target).__name__}")


def _op_setitem(m):
    value = m.pop()
    key = m.pop()
    _set_items(m, m.top(), [key, value])


def _op_setitems(m):
    items = m.pop_mark()
    if items:
        _set_items(m, m.top(), items)


def _op_additems(m):
    items = m.pop_mark()
    if not items:
        return
    target = m.top()
    if isinstance(target, (Refused, Opaque)):
        return
    if not isinstance(target, set):
        raise MalformedPickle(f"ADDITEMS on a {type(target).__name__}")
    target.update(_key(x) for x in items)


def _op_frozenset(m):
    items = m.pop_mark()
    m.push_built(frozenset(_key(x) for x in items), 216 + 30 * len(items))


def _op_global(m):
    module = m._line().decode("utf-8")
    name = m._line().decode("utf-8")
    m.push(m.resolve(module, name))


def _op_stack_global(m):
    name = m.pop()
    module = m.pop()
    if type(module) is not str or type(name) is not str:
        m.finding("<unresolved>", "<unresolved>", DANGEROUS,
                  "STACK_GLOBAL operands are not plain strings: the global cannot be known")
        m.push(Refused("unresolved STACK_GLOBAL"))
        return
    m.push(m.resolve(module, name))


def _op_reduce(m):
    args = m.pop()
    func = m.pop()
    if not isinstance(args, tuple):
        if isinstance(args, (Refused, Opaque)):
            args = ()
        else:
            raise MalformedPickle("REDUCE without an argument tuple")
    m.push_built(m.call(func, args), 112)


def _op_build(m):
    state = m.pop()
    obj = m.top()
    if isinstance(obj, StateDict):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0] if isinstance(state[0], dict) else {}
        if isinstance(state, dict):
            obj.attrs.update(state)
    elif isinstance(obj, (Opaque, Refused, TensorRef)):
        pass  # inert stand-ins take no state
    else:
        raise MalformedPickle(f"BUILD on a {type(obj).__name__}")


def _op_newobj(m):
    args = m.pop()
    cls = m.pop()
    if not isinstance(args, tuple):
        raise MalformedPickle("NEWOBJ expected an arg tuple")
    m.push_built(m.call(cls, args), 112)


def _op_newobj_ex(m):
    kwargs = m.pop()
    args = m.pop()
    cls = m.pop()
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise MalformedPickle("NEWOBJ_EX expected an arg tuple and a kwargs dict")
    m.push_built(m.call(cls, args, {str(k): v for k, v in kwargs.items()}), 112)


def _instantiate(m, cls, args):
    if isinstance(cls, Refused) or isinstance(cls, Opaque) and cls.what.endswith("(allowed)"):
        m.push_built(m.call(cls, args), 112)
        return
    # INST/OBJ construct or call: an allowlisted global is not built this way by torch
    what = getattr(cls, "what", None) or getattr(cls, "__name__", type(cls).__name__)
    m.finding("", str(what), UNKNOWN, f"{m.op_name} builds an object from an allowlisted name")
    m.push(Refused(str(what), "call"))


def _op_inst(m):
    module = m._line().decode("utf-8")
    name = m._line().decode("utf-8")
    cls = m.resolve(module, name)
    _instantiate(m, cls, tuple(m.pop_mark()))


def _op_obj(m):
    items = m.pop_mark()
    if not items:
        raise MalformedPickle("unpickling stack underflow")
    _instantiate(m, items[0], tuple(items[1:]))


def _op_ext(m, n):
    code = m._u(n)
    if code <= 0:
        raise MalformedPickle("EXT specifies code <= 0")
    m.finding("copyreg", f"extension {code}", UNKNOWN,
              "a global named through copyreg's extension registry (resolved by the loading process)")
    m.push(Refused(f"extension {code}"))


def _op_persid(m):
    # a text id reaches persistent_load as a str: torch refuses it, plain pickle raises
    m.push(Opaque(f"persistent id {m.src.readline()[:-1][:40]!r}"))


def _op_binpersid(m):
    m.push(_persistent(m, m.pop()))


def _persistent(m, pid):
    """('storage', storage_type, key, location, numel[, view]) as torch writes it;
    legacy ('module', cls, source_file, source) returns the class."""
    if not isinstance(pid, tuple) or not pid:
        raise MalformedPickle("unexpected persistent id")
    kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module" and len(pid) >= 2:
        return pid[1]
    if kind != "storage" or len(pid) not in (5, 6):
        raise MalformedPickle(f"unexpected persistent id {str(kind)[:20]!r}")
    storage_type, key, location, numel = pid[1:5]
    if isinstance(storage_type, (Refused, Opaque)):
        return Refused("storage of a refused type", "call")
    if not isinstance(storage_type, StorageType):
        raise MalformedPickle("persistent id without a storage type")
    if not isinstance(numel, int) or numel < 0:
        raise MalformedPickle("bad storage size")
    return StorageRef(storage_type.dtype, str(key), str(location), numel, tuple(pid[5:]))


def _op_proto(m):
    proto = m.src.read(1)[0]
    if proto > HIGHEST_PROTOCOL:
        raise MalformedPickle(f"unsupported pickle protocol: {proto}")
    m.proto = proto


def _op_frame(m):
    m.src.frame(m._u(8))


def _op_next_buffer(m):
    raise MalformedPickle("pickle stream refers to out-of-band data but no buffers argument was given")


def _op_readonly_buffer(m):
    m.top()


def _push(value):
    return lambda m: m.push(value)


def _op_dup(m):
    m.push(m.top())


def _op_memoize(m):
    memo = m.memo
    memo[len(memo)] = m.top()


def _op_pop_mark(m):
    m.pop_mark()


def _text_key(m):
    line = m._line()
    return int(line, 10)


_DISPATCH: dict[int, tuple[str, Any]] = {}


def _register(code: bytes, name: str, handler):
    _DISPATCH[code[0]] = (name, handler)


for _code, _name, _handler in [
    (b"I", "INT", _op_int),
    (b"J", "BININT", lambda m: m.push(int.from_bytes(m.src.read(4), "little", signed=True))),
    (b"K", "BININT1", lambda m: m.push(m.src.read(1)[0])),
    (b"M", "BININT2", lambda m: m.push(m._u(2))),
    (b"L", "LONG", _op_long),
    (b"\x8a", "LONG1", lambda m: _long_from(m, m.src.read(m.src.read(1)[0]))),
    (b"\x8b", "LONG4", _op_long4),
    (b"F", "FLOAT", lambda m: m.push(float(m.src.readline()[:-1]))),
    (b"G", "BINFLOAT", lambda m: m.push(struct.unpack(">d", m.src.read(8))[0])),
    (b"S", "STRING", _op_string),
    (b"T", "BINSTRING", lambda m: _op_binstring(m, _signed_len(m))),
    (b"U", "SHORT_BINSTRING", lambda m: _op_binstring(m, m.src.read(1)[0])),
    (b"V", "UNICODE", _op_unicode),
    (b"X", "BINUNICODE", lambda m: _op_binunicode(m, m._u(4))),
    (b"\x8c", "SHORT_BINUNICODE", lambda m: _op_binunicode(m, m.src.read(1)[0])),
    (b"\x8d", "BINUNICODE8", lambda m: _op_binunicode(m, m._u(8))),
    (b"B", "BINBYTES", lambda m: _op_binbytes(m, 4)),
    (b"C", "SHORT_BINBYTES", lambda m: _op_binbytes(m, 1)),
    (b"\x8e", "BINBYTES8", lambda m: _op_binbytes(m, 8)),
    (b"\x96", "BYTEARRAY8", _op_bytearray8),
    (b"\x97", "NEXT_BUFFER", _op_next_buffer),
    (b"\x98", "READONLY_BUFFER", _op_readonly_buffer),
    (b"N", "NONE", _push(None)),
    (b"\x88", "NEWTRUE", _push(True)),
    (b"\x89", "NEWFALSE", _push(False)),
    (b")", "EMPTY_TUPLE", _push(())),
    (b"]", "EMPTY_LIST", lambda m: m.push_built([], 56)),
    (b"}", "EMPTY_DICT", lambda m: m.push_built({}, 64)),
    (b"\x8f", "EMPTY_SET", lambda m: m.push_built(set(), 216)),
    (b"(", "MARK", _op_mark),
    (b"1", "POP_MARK", _op_pop_mark),
    (b"0", "POP", _op_pop),
    (b"2", "DUP", _op_dup),
    (b"t", "TUPLE", _op_tuple),
    (b"\x85", "TUPLE1", _op_tuple_n(1)),
    (b"\x86", "TUPLE2", _op_tuple_n(2)),
    (b"\x87", "TUPLE3", _op_tuple_n(3)),
    (b"l", "LIST", _op_list),
    (b"d", "DICT", _op_dict),
    (b"\x91", "FROZENSET", _op_frozenset),
    (b"a", "APPEND", _op_append),
    (b"e", "APPENDS", _op_appends),
    (b"s", "SETITEM", _op_setitem),
    (b"u", "SETITEMS", _op_setitems),
    (b"\x90", "ADDITEMS", _op_additems),
    (b"c", "GLOBAL", _op_global),
    (b"\x93", "STACK_GLOBAL", _op_stack_global),
    (b"R", "REDUCE", _op_reduce),
    (b"b", "BUILD", _op_build),
    (b"\x81", "NEWOBJ", _op_newobj),
    (b"\x92", "NEWOBJ_EX", _op_newobj_ex),
    (b"i", "INST", _op_inst),
    (b"o", "OBJ", _op_obj),
    (b"\x82", "EXT1", lambda m: _op_ext(m, 1)),
    (b"\x83", "EXT2", lambda m: _op_ext(m, 2)),
    (b"\x84", "EXT4", lambda m: _op_ext(m, 4)),
    (b"P", "PERSID", _op_persid),
    (b"Q", "BINPERSID", _op_binpersid),
    (b"p", "PUT", lambda m: _op_put(m, _text_key(m))),
    (b"q", "BINPUT", lambda m: _op_put(m, m.src.read(1)[0])),
    (b"r", "LONG_BINPUT", lambda m: _op_put(m, m._u(4))),
    (b"\x94", "MEMOIZE", _op_memoize),
    (b"g", "GET", lambda m: _op_get(m, _text_key(m))),
    (b"h", "BINGET", lambda m: _op_get(m, m.src.read(1)[0])),
    (b"j", "LONG_BINGET", lambda m: _op_get(m, m._u(4))),
    (b"\x80", "PROTO", _op_proto),
    (b"\x95", "FRAME", _op_frame),
    (b".", "STOP", None),
]:
    _register(_code, _name, _handler)


def _signed_len(m) -> int:
    n = int.from_bytes(m.src.read(4), "little", signed=True)
    if n < 0:
        raise MalformedPickle("BINSTRING pickle has negative byte count")
    return n


_STUB_SET = {v for v in ALLOWED_GLOBALS.values() if callable(v) and not isinstance(v, _TypeMarker)} | _CALLABLE_STUBS


def _sanitize(value, depth: int = 0, seen: IdentitySet | None = None, flat: IdentitySet | None = None,
              path: set | None = None):
    """The walked value with cycles, over-deep nesting and repeated non-flat shared structure
    replaced by Opaque stand-ins, so consumers can recurse over it safely.

    In place: lists and dicts keep their identity and get their replaced items written back;
    a tuple is rebuilt only when one of its items was replaced. No copy of the value is made,
    and the expanded containers are remembered in bitmaps (`seen`, and `flat`: those that held
    no container when they were expanded), so a million-value list costs no per-value memory."""
    if seen is None:
        seen, flat, path = IdentitySet(), IdentitySet(), set()
    if isinstance(value, _IdKey):
        value = value.value
    if not isinstance(value, (dict, list, tuple, set, frozenset)) or not value:
        return value
    ident = id(value)
    if ident in path:
        return Opaque("cycle")
    if seen.add(value):  # shared (memo) structure: only flat leaves are repeated, so a DAG never explodes
        return value if value in flat else Opaque("shared reference")
    if depth >= MAX_VALUE_DEPTH:
        seen.discard(value)  # not expanded here: a shallower reference still expands it
        return Opaque("nested too deep")
    if not isinstance(value, dict) and not any(isinstance(v, (dict, list, tuple, set, frozenset)) for v in value):
        flat.add(value)
        return value  # no item of a flat container is replaced (sets hold scalars and identity keys only)
    if isinstance(value, (set, frozenset)):
        return value
    path.add(ident)
    try:
        if isinstance(value, dict):
            for k, v in value.items():  # only existing keys' values are written back: the dict keeps its size
                if isinstance(k, _IdKey):  # hashed by identity: its value can be replaced in place
                    k.value = _sanitize(k.value, depth + 1, seen, flat, path)
                new = _sanitize(v, depth + 1, seen, flat, path)
                if new is not v:
                    value[k] = new
            out = value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                new = _sanitize(v, depth + 1, seen, flat, path)
                if new is not v:
                    value[i] = new
            out = value
        else:
            items = None
            for i, v in enumerate(value):
                new = _sanitize(v, depth + 1, seen, flat, path)
                if new is not v and items is None:
                    items = list(value[:i])
                if items is not None:
                    items.append(new)
            out = value if items is None else tuple(items)
    finally:
        path.discard(ident)
    return out
