"""SentencePiece `tokenizer.model` files, read with a small protobuf wire-format reader
(fields from sentencepiece_model.proto), so omgtool needs neither protobuf nor
sentencepiece to list the pieces.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from omgtool.errors import UnreadableInput

# sentencepiece_model.proto: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: str = "unigram"
    byte_fallback: bool = False
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    normalizer: str = "nmt_nfkc"
    has_charsmap: bool = False
    notes: list[str] = field(default_factory=list)

    def ids_of(self, *types: int) -> list[int]:
        return [i for i, (_, _, t) in enumerate(self.pieces) if t in types]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """(field number, wire type, value) for each field of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield num, wire, value


def read_spm(path: Path) -> SpmModel:
    """The parts of a SentencePiece ModelProto a fast-tokenizer conversion needs."""
    try:
        data = Path(path).read_bytes()
        model = SpmModel(pieces=[])
        for num, wire, value in _fields(data):
            if num == 1 and wire == 2:  # pieces
                piece, score, typ = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        typ = v
                model.pieces.append((piece, score, typ))
            elif num == 2 and wire == 2:  # trainer_spec
                for n, w, v in _fields(value):
                    if n == 3 and w == 0:
                        model.model_type = MODEL_TYPES.get(v, str(v))
                    elif n == 35 and w == 0:
                        model.byte_fallback = bool(v)
            elif num == 3 and wire == 2:  # normalizer_spec
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        model.normalizer = v.decode("utf-8")
                    elif n == 2 and w == 2:
                        model.has_charsmap = len(v) > 0
                    elif n == 3 and w == 0:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4 and w == 0:
                        model.remove_extra_whitespaces = bool(v)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UnreadableInput(f"tokenizer.model is not a readable SentencePiece model ({exc})", path) from None
    if not model.pieces:
        raise UnreadableInput("tokenizer.model holds no pieces", path)
    if model.model_type != "bpe":
        model.notes.append(f"SentencePiece model type is {model.model_type}, not BPE: LlamaTokenizer "
                           "(BPE) may not reproduce it")
    if model.normalizer != "identity" and model.has_charsmap:
        model.notes.append(f"SentencePiece normalizer {model.normalizer!r} is not reproduced by LlamaTokenizer")
    if model.remove_extra_whitespaces:
        model.notes.append("SentencePiece collapses repeated spaces (remove_extra_whitespaces); "
                           "LlamaTokenizer keeps them")
    return model
