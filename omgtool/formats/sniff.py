"""What a file is, from its first bytes: choose the reader by content, never by extension.

`sniff` returns the checkpoint kind omgtool reads ("torch-zip", "torch-legacy",
"safetensors", "json") or raises UnreadableInput saying what the file looks like
instead ("not a checkpoint: looks like GGUF"), so a JPEG is never reported as a
safetensors file with an absurd header length.
"""

from __future__ import annotations

from pathlib import Path

from omgtool.errors import UnreadableInput

HEAD_BYTES = 1024

ZIP_LOCAL = b"PK\x03\x04"
ZIP_EMPTY = b"PK\x05\x06"
PICKLE_PROTO = 0x80

# (offset, magic, what it is) — checked in order, first match wins.
FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GGUF", "GGUF (llama.cpp)"),
    (0, b"lmgg", "GGML (llama.cpp, legacy)"),
    (0, b"tjgg", "GGJT (llama.cpp, legacy)"),
    (0, b"\x89HDF\r\n\x1a\n", "HDF5 (Keras .h5 or another framework)"),
    (512, b"\x89HDF\r\n\x1a\n", "HDF5 (Keras .h5 or another framework)"),
    (0, b"\x93NUMPY", "a NumPy .npy array"),
    (4, b"TFL3", "TensorFlow Lite"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x7fELF", "an ELF executable"),
    (0, b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (0, b"BZh", "a bzip2-compressed file (decompress it first)"),
    (0, b"\xfd7zXZ\x00", "an xz-compressed file (decompress it first)"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd-compressed file (decompress it first)"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (0, b"Rar!\x1a\x07", "a RAR archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"version https://git-lfs", "a Git LFS pointer (the download fetched the pointer, not the weights)"),
)


def _not_a_checkpoint(what: str, path: Path) -> UnreadableInput:
    return UnreadableInput(f"not a checkpoint: looks like {what}", path)


def tar_header_valid(head: bytes) -> bool:
    """The first 512-byte block is a tar header with a correct checksum (what `tarfile` checks)."""
    if len(head) < 512 or head[:512].count(0) == 512:
        return False
    field = head[148:156].replace(b"\x00", b" ").strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    block = head[:148] + b" " * 8 + head[156:512]
    unsigned = sum(block)
    signed = sum(b - 256 if b > 127 else b for b in block)
    return stored in (unsigned, signed)


def _looks_like_onnx(head: bytes) -> bool:
    # ModelProto: field 1 (ir_version, varint 3..15) then a length-delimited field 2..8.
    return (len(head) > 3 and head[0] == 0x08 and 1 <= head[1] <= 15
            and head[2] in (0x12, 0x1a, 0x22, 0x2a, 0x32, 0x3a, 0x42))


def _looks_like_text(head: bytes) -> bool:
    for cut in range(4):  # the block boundary may split a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c in "\t\r\n\f" for c in text)
    return False


def safetensors_plausible(head: bytes, size: int) -> bool:
    """8-byte little-endian header length that fits the file, then a JSON object."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and _json_object_at_8(head)


def _json_object_at_8(head: bytes) -> bool:
    return head[8:72].lstrip(b" \t\r\n")[:1] == b"{"


def foreign_kind(head: bytes, path: Path) -> str | None:
    for offset, magic, what in FOREIGN_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what
    if tar_header_valid(head):
        return "a tar archive"
    if _looks_like_onnx(head):
        return "ONNX (or another protobuf file)"
    if path.name == "saved_model.pb":
        return "a TensorFlow SavedModel"
    return None


def sniff(path: Path) -> str:
    """The reader to use for `path`: torch-zip, torch-legacy, safetensors or json."""
    size = path.stat().st_size
    if size == 0:
        raise UnreadableInput("file is empty", path)
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if head.startswith(ZIP_LOCAL):
        return "torch-zip"
    if head.startswith(ZIP_EMPTY):
        raise _not_a_checkpoint("an empty zip archive", path)
    if tar_header_valid(head):
        # torch.load tries tarfile before the legacy pickle format (torch < 0.4 wrote tar files).
        raise UnreadableInput("tar-format legacy torch file (torch < 0.4) or another tar archive: not "
                              "supported; load it with that torch and save it again", path)
    if safetensors_plausible(head, size):  # before the pickle test: a length of 128 starts with 0x80
        return "safetensors"
    if head[0] == PICKLE_PROTO:
        return "torch-legacy"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") and _looks_like_text(head):
        return "json"
    what = foreign_kind(head, path)
    if what is not None:
        raise _not_a_checkpoint(what, path)
    if _json_object_at_8(head) or path.suffix == ".safetensors":
        return "safetensors"  # its reader says what is wrong (a cut-off file, a bad length)
    if head[:1] == b"<" and _looks_like_text(head):
        raise _not_a_checkpoint("HTML or XML (a web page saved instead of the file?)", path)
    if _looks_like_text(head):
        raise _not_a_checkpoint("a text file", path)
    if len(head) >= 8 and int.from_bytes(head[:8], "little") > size - 8:
        raise UnreadableInput(f"not a recognised checkpoint format (first bytes {head[:8].hex()}: not a "
                              f"zip, a pickle, or a safetensors header that fits the file)", path)
    raise UnreadableInput(f"not a recognised checkpoint format (first bytes {head[:8].hex()})", path)
