"""Walk a pickle's opcodes against an allowlist; never execute it.

The walker is a tiny stack machine that understands the opcodes `torch.save`
emits. Allowlisted globals are replaced by inert stand-ins (a tensor rebuild
becomes a `TensorRef` describing where the bytes live); every other global, and
every opcode that would construct arbitrary objects, is recorded as a
`Finding`. Nothing from the pickle is ever imported or called.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from omgtool.errors import Finding
from omgtool.formats.dtypes import STORAGE_DTYPES, TORCH_DTYPE_NAMES

# Resource caps, so a hostile file cannot exhaust memory or time.
MAX_OPCODES = 20_000_000
MAX_STACK = 100_000
MAX_MEMO = 5_000_000


class MalformedPickle(Exception):
    """The byte stream is not a pickle this walker can follow."""


@dataclass(frozen=True)
class StorageRef:
    dtype: str
    key: str
    location: str
    numel: int
    extra: tuple = ()  # persistent-id fields past the 5th (legacy files: view_metadata)


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class Opaque:
    """Inert stand-in for an allowlisted non-tensor object (a device, a numpy scalar)."""

    what: str

    def __repr__(self) -> str:
        return f"<{self.what}>"


@dataclass
class Refused:
    """Stand-in for anything built from a disallowed global; already reported."""

    what: str

    def __repr__(self) -> str:
        return f"<refused {self.what}>"


class StateDict(dict):
    """collections.OrderedDict stand-in; keeps BUILD state (e.g. `_metadata`) aside."""

    def __init__(self, *args):
        super().__init__(*args)
        self.attrs: dict = {}


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _TypeMarker:
    name: str


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise MalformedPickle("tensor rebuild without a storage persistent id")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not callable(func) or func not in _CALLABLE_STUBS:
        raise MalformedPickle("_rebuild_from_type_v2 with a function outside the allowlist")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise MalformedPickle("_codecs.encode with unexpected arguments")
    return text.encode(encoding)


def _ordered_dict(*args):
    return StateDict(*args)


def _opaque(what):
    return lambda *args, **kwargs: Opaque(what)


_CALLABLE_STUBS = {
    _rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter, _rebuild_from_type_v2,
    _codecs_encode, _ordered_dict,
}

# (module, name) -> inert stand-in. Everything else is a finding.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): lambda *a: tuple(a[0]) if a else (),
    ("torch", "device"): _opaque("torch.device"),
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    # numpy metadata that training frameworks leave in checkpoints: inert stubs.
    ("numpy.core.multiarray", "_reconstruct"): _opaque("numpy.ndarray"),
    ("numpy._core.multiarray", "_reconstruct"): _opaque("numpy.ndarray"),
    ("numpy.core.multiarray", "scalar"): _opaque("numpy scalar"),
    ("numpy._core.multiarray", "scalar"): _opaque("numpy scalar"),
    ("numpy", "dtype"): _opaque("numpy.dtype"),
    ("numpy", "ndarray"): _opaque("numpy.ndarray"),
}
for _name, _dtype in STORAGE_DTYPES.items():
    ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_dtype)
for _name in TORCH_DTYPE_NAMES:
    ALLOWED_GLOBALS[("torch", _name)] = Opaque(f"torch.{_name}")
_ALLOWED_CALLABLES = [v for v in ALLOWED_GLOBALS.values() if callable(v)]


@dataclass
class WalkResult:
    value: Any
    findings: list[Finding] = field(default_factory=list)
    globals_seen: set[str] = field(default_factory=set)
    end_offset: int = 0


_MARK = object()


def walk(stream: BinaryIO | bytes, member: str = "") -> WalkResult:
    """Interpret one pickle (up to its STOP) without executing anything.

    `stack` is rebound by MARK handling: always pop the mark before touching it.
    """
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(stream))
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    result = WalkResult(value=None)

    def finding(module: str, name: str, op: str, pos: int) -> None:
        result.findings.append(Finding(module, name, op, pos, member))

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not metastack:
            raise MalformedPickle("MARK expected")
        items = stack
        stack = metastack.pop()
        return items

    def resolve_global(module: str, name: str, op: str, pos: int):
        result.globals_seen.add(f"{module}.{name}")
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            finding(module, name, op, pos)
            return Refused(f"{module}.{name}")
        return target

    def call(func, args, op: str, pos: int):
        if isinstance(func, Refused):
            return Refused(func.what)
        if isinstance(func, Opaque):
            return Opaque(func.what)
        if func in _ALLOWED_CALLABLES:
            try:
                return func(*args)
            except MalformedPickle:
                raise
            except Exception as exc:  # a stub rejected its arguments
                raise MalformedPickle(f"{op} at {pos}: bad arguments ({exc})") from None
        finding("", repr(func)[:60], op, pos)
        return Refused(op)

    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            count += 1
            if count > MAX_OPCODES or len(stack) > MAX_STACK or len(memo) > MAX_MEMO:
                raise MalformedPickle("pickle exceeds resource limits")
            name = opcode.name
            pos = pos or 0
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1:
                    raise MalformedPickle("STOP with a malformed stack")
                result.value = stack.pop()
                result.end_offset = stream.tell()
                return result
            if name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in ("EMPTY_DICT",):
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("EMPTY_SET",):
                stack.append(set())
            elif name == "TUPLE":
                items = pop_mark()
                stack.append(tuple(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise MalformedPickle("stack underflow")
                items = stack[-n:]
                del stack[-n:]
                stack.append(tuple(items))
            elif name == "LIST":
                items = pop_mark()
                stack.append(list(items))
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name == "FROZENSET":
                items = pop_mark()
                stack.append(frozenset(_hashable(x) for x in items))
            elif name == "ADDITEMS":
                items = pop_mark()
                stack[-1].update(_hashable(x) for x in items)
            elif name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
                          "BINSTRING", "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES",
                          "BINBYTES8", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
                          "LONG4", "FLOAT", "BINFLOAT"):
                stack.append(arg)
            elif name == "BYTEARRAY8":
                stack.append(bytearray(arg))
            elif name == "NONE":
                stack.append(None)
            elif name == "NEWTRUE":
                stack.append(True)
            elif name == "NEWFALSE":
                stack.append(False)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise MalformedPickle(f"memo key {arg} missing at {pos}")
                stack.append(memo[arg])
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "APPEND":
                value = stack.pop()
                _target(stack[-1], list).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                _target(stack[-1], list).extend(items)
            elif name == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _target(stack[-1], dict)[_hashable(key)] = value
            elif name == "SETITEMS":
                items = pop_mark()
                target = _target(stack[-1], dict)
                for key, value in zip(items[::2], items[1::2]):
                    target[_hashable(key)] = value
            elif name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                stack.append(resolve_global(module, attr, name, pos))
            elif name == "STACK_GLOBAL":
                attr = stack.pop()
                module = stack.pop()
                if not isinstance(module, str) or not isinstance(attr, str):
                    finding("<unresolved>", "<unresolved>", name, pos)
                    stack.append(Refused("unresolved STACK_GLOBAL"))
                else:
                    stack.append(resolve_global(module, attr, name, pos))
            elif name == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                if not isinstance(args, tuple):
                    raise MalformedPickle(f"REDUCE without an argument tuple at {pos}")
                stack.append(call(func, args, name, pos))
            elif name == "BUILD":
                state = stack.pop()
                obj = stack[-1]
                if isinstance(obj, StateDict):
                    obj.attrs.update(state if isinstance(state, dict) else {"state": state})
                elif isinstance(obj, (Opaque, Refused, TensorRef)):
                    pass  # inert stand-ins take no state
                else:
                    finding("", type(obj).__name__, name, pos)
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()  # kwargs
                args = stack.pop()
                cls = stack.pop()
                if isinstance(cls, (Refused, Opaque)):
                    stack.append(type(cls)(cls.what))
                else:
                    finding("", repr(cls)[:60], name, pos)
                    stack.append(Refused(name))
            elif name == "INST":
                module, _, attr = arg.partition(" ")
                items = pop_mark()
                target = resolve_global(module, attr, name, pos)
                if not isinstance(target, Refused):  # INST constructs a class instance: never allowed
                    finding(module, attr, name, pos)
                stack.append(Refused(f"{module}.{attr}"))
            elif name == "OBJ":
                items = pop_mark()
                cls = items[0] if items else None
                if not isinstance(cls, Refused):
                    finding("", repr(cls)[:60], name, pos)
                stack.append(Refused("OBJ"))
            elif name in ("EXT1", "EXT2", "EXT4"):
                finding("copyreg", f"extension {arg}", name, pos)
                stack.append(Refused(f"extension {arg}"))
            elif name == "BINPERSID":
                stack.append(_persistent_storage(stack.pop(), pos))
            elif name == "PERSID":
                finding("", f"persistent id {arg!r}", name, pos)
                stack.append(Refused("PERSID"))
            else:
                raise MalformedPickle(f"unsupported opcode {name} at {pos}")
    except (IndexError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedPickle(f"malformed pickle ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # raised by genops on truncated or invalid streams
        raise MalformedPickle(str(exc) or "truncated pickle") from None
    raise MalformedPickle("pickle ended without STOP (truncated)")


def _target(obj, kind):
    if isinstance(obj, Refused):
        return kind()  # throwaway container: the refusal is already recorded
    if not isinstance(obj, kind):
        raise MalformedPickle(f"cannot add items to {type(obj).__name__}")
    return obj


def _hashable(key):
    if isinstance(key, list):
        return tuple(key)
    if isinstance(key, (dict, set)):
        raise MalformedPickle("unhashable key")
    return key


def _persistent_storage(pid, pos) -> StorageRef | Refused:
    """('storage', storage_type, key, location, numel[, view_metadata]) as torch writes it."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise MalformedPickle(f"unexpected persistent id at {pos}")
    storage_type, key, location, numel = pid[1:5]
    if isinstance(storage_type, Refused):
        return Refused("storage")
    if not isinstance(storage_type, _StorageType):
        raise MalformedPickle(f"persistent id without a storage type at {pos}")
    if not isinstance(numel, int) or numel < 0:
        raise MalformedPickle(f"bad storage size at {pos}")
    return StorageRef(storage_type.dtype, str(key), str(location), numel, tuple(pid[5:]))
