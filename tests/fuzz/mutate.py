"""Mutations that know the containers: zip headers, pickle opcodes, safetensors JSON, side files.

Every mutator takes (random.Random, bytes) and returns new bytes; `mutate_file` picks one
that fits the file. Deterministic for a given Random state.
"""

from __future__ import annotations

import copy
import io
import json
import pickletools
import random
import struct
import warnings
import zipfile

INTERESTING_INTS = (0, 1, -1, 2, 7, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -2**63)
INTERESTING_JSON = (-1, 0, 1, 2**32, 2**63, 2**64, 2**70, 1.5, float("inf"), True, False, None, "x",
                    "F32", "\ud800", [], {}, [1, 2], [2**32, 2**32], [False, True], [[1]], {"a": 1},
                    "a" * 300, "/etc/passwd", "../outside.safetensors", "(a+)+$", [0, 2**64],
                    10**400)


def _bits(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x28, 0x5D, 0x7B))
    return bytes(buf)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(1, len(data))] if len(data) > 1 else b""


def _splice(rng: random.Random, data: bytes) -> bytes:
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    choice = rng.randrange(3)
    if choice == 0:
        return data[:i] + data[j:]  # delete
    if choice == 1:
        return data[:j] + data[i:j] + data[j:]  # duplicate
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[i:]


def _zip_field(rng: random.Random, data: bytes) -> bytes:
    """Overwrite one field of a local header, central directory entry or end record."""
    layouts = {b"PK\x03\x04": [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
               b"PK\x01\x02": [(8, 2), (10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)],
               b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]}
    spots = [(i, sig) for sig in layouts for i in _find_all(data, sig)]
    if not spots:
        return _bits(rng, data)
    at, sig = rng.choice(spots)
    off, width = rng.choice(layouts[sig])
    value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
    if rng.random() < 0.3:
        old = int.from_bytes(data[at + off:at + off + width], "little")
        value = (old + rng.choice((-1, 1, 64, -64))) % (1 << (8 * width))
    return data[:at + off] + value.to_bytes(width, "little") + data[at + off + width:]


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0 and len(out) < 10_000:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


# --- pickles -------------------------------------------------------------------------------

def _ops(pkl: bytes):
    try:
        return list(pickletools.genops(pkl))
    except Exception:
        return []


def _encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<I", len(raw)) + raw


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def mutate_pickle(rng: random.Random, pkl: bytes) -> bytes:
    ops = _ops(pkl)
    if not ops:
        return _bits(rng, pkl)
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    idx = rng.randrange(len(ops))
    op, arg, pos = ops[idx]
    pos = pos or 0
    end = ends[idx]
    kind = rng.randrange(9)
    if kind == 0 and isinstance(arg, int) and op.name not in ("PROTO", "BINPUT", "LONG_BINPUT", "BINGET",
                                                             "LONG_BINGET", "FRAME"):
        new = _encode_int(rng.choice(INTERESTING_INTS))
    elif kind == 1 and isinstance(arg, str) and op.name.endswith("UNICODE"):
        new = _encode_str(rng.choice(("\ud800", "a\udcff", "x" * 70_000, "", "model.layers.99999999999.w",
                                      "\x00\n", "llm.model.layers.7.attention.wqkv.weight")))
    elif kind == 2:
        new = b""  # delete the opcode
    elif kind == 3:
        new = pkl[pos:end] * rng.choice((2, 3, 100))  # repeat it
    elif kind == 4:
        depth = rng.choice((50, 1000, 5000))
        new = b"(" * depth + b"t" * depth  # nested empty tuples... then keep the op
        new += pkl[pos:end]
    elif kind == 5:
        new = rng.choice((b"(", b"0", b"1", b"2", b"t", b"l", b"d", b"s", b"u", b"e", b"a", b"R", b"b",
                          b"N", b"]", b"}", b")", b"\x85", b"\x86", b"\x87", b"\x88", b"\x89",
                          b"q\x00", b"h\x00", b"\x94")) + pkl[pos:end]
    elif kind == 6 and op.name in ("GLOBAL",):
        new = b"c" + rng.choice((b"collections\nOrderedDict\n", b"torch\nFloatStorage\n",
                                 b"torch._utils\n_rebuild_tensor_v2\n", b"torch\nSize\n",
                                 b"torch\nHalfStorage\n", b"_codecs\nencode\n")) 
    elif kind == 7:
        new = b"G" + struct.pack(">d", rng.choice((float("inf"), float("nan"), 1e300, -0.0, 2.5)))
    else:
        return _bits(rng, pkl)
    return pkl[:pos] + new + pkl[end:]


def _zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return [(i, zf.read(i)) for i in zf.infolist()]
    except Exception:
        return None


def _rezip(members, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for info, raw in members:
            zf.writestr(info, raw)
    return buf.getvalue()


def zip_pickle(rng: random.Random, data: bytes) -> bytes:
    """Mutate the data.pkl inside a zip and write the archive back (valid container, odd pickle),
    or change the archive's structure: duplicate, rename, drop or deflate members."""
    members = _zip_members(data)
    if not members:
        return _bits(rng, data)
    kind = rng.randrange(6)
    pkl_i = next((i for i, (info, _) in enumerate(members) if info.filename.endswith("data.pkl")), 0)
    if kind <= 2:
        info, raw = members[pkl_i]
        for _ in range(rng.randint(1, 3)):
            raw = mutate_pickle(rng, raw)
        members[pkl_i] = (info, raw)
    elif kind == 3:
        members.append(rng.choice(members))  # a duplicate name
    elif kind == 4:
        i = rng.randrange(len(members))
        if rng.random() < 0.5:
            del members[i]
        else:
            info, raw = members[i]
            info.compress_type = zipfile.ZIP_DEFLATED
            members[i] = (info, raw)
    else:
        i = rng.randrange(len(members))
        info, raw = members[i]
        info.filename = rng.choice(("x/data.pkl", info.filename.replace("/", "/../"),
                                    "other/" + info.filename, info.filename + ".pkl"))
        members[i] = (info, raw)
    return _rezip(members, rng)


def legacy_pickle(rng: random.Random, data: bytes) -> bytes:
    """Mutate one of the pickles of a legacy file (magic, protocol, sys_info, data, keys)."""
    ends, pos = [], 0
    for _ in range(5):
        ops = _ops(data[pos:])
        if not ops:
            break
        stop = next((p for op, _, p in ops if op.name == "STOP"), None)
        if stop is None:
            break
        ends.append((pos, pos + stop + 1))
        pos += stop + 1
    if not ends:
        return _bits(rng, data)
    a, b = rng.choice(ends)
    return data[:a] + mutate_pickle(rng, data[a:b]) + data[b:]


# --- JSON ----------------------------------------------------------------------------------

def _json_edit(rng: random.Random, obj):
    """Replace, add or delete one value somewhere in `obj` (in place where possible)."""
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    value = copy.deepcopy(rng.choice(INTERESTING_JSON))
    if not path:
        return value if rng.random() < 0.2 else obj
    parent, key = path[-1]
    if rng.random() < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif rng.random() < 0.15 and isinstance(parent, dict):
        parent[rng.choice(("__metadata__", "weight_map", "lora_alpha", "r", "alpha_pattern", "rank_pattern",
                           "num_hidden_layers", "use_rslora", "x\ud800"))] = value
    else:
        parent[key] = value
    return obj


def _dumps(obj, rng: random.Random) -> bytes:
    text = json.dumps(obj, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")


def safetensors_header(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 8:
        return _bits(rng, data)
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except Exception:
        return _bits(rng, data)
    for _ in range(rng.randint(1, 3)):
        header = _json_edit(rng, header)
    new = _dumps(header, rng)
    length = len(new) if rng.random() < 0.9 else rng.choice(INTERESTING_INTS) % (1 << 64)
    return struct.pack("<Q", length) + new + data[8 + n:]


def json_file(rng: random.Random, data: bytes) -> bytes:
    try:
        obj = json.loads(data)
    except Exception:
        return _bits(rng, data)
    for _ in range(rng.randint(1, 3)):
        obj = _json_edit(rng, obj)
    if rng.random() < 0.05:
        return b"[" * 100_000
    return _dumps(obj, rng)


GENERIC = (_bits, _bytes, _truncate, _splice)


def mutator_for(name: str, data: bytes):
    if data[:4] == b"PK\x03\x04":
        return GENERIC + (_zip_field, zip_pickle, zip_pickle, zip_pickle)
    if data[:1] == b"\x80":
        return GENERIC + (legacy_pickle, legacy_pickle, legacy_pickle)
    if name.endswith(".json"):
        return (json_file, json_file, json_file, _truncate, _bits)
    if name.endswith(".safetensors"):
        return GENERIC + (safetensors_header, safetensors_header, safetensors_header)
    return GENERIC


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[bytes, str]:
    if len(data) < 2:
        return data + b"\x00", "grow"
    fn = rng.choice(mutator_for(name, data))
    return fn(rng, data), fn.__name__.lstrip("_")
