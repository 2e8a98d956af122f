"""Zip archives read the way torch's `PyTorchFileReader` (miniz) reads them.

Where Python's `zipfile` is lenient, miniz is not, and the two can see different files
in one polyglot archive:

- the end-of-central-directory record is the last signature with 22 bytes after it,
  within the last 64 KiB; a zip64 locator just before it wins;
- the central directory is read at the offset the record states: no correction for
  prepended data (zipfile shifts every offset by the gap it finds), so an archive with
  a second central directory is read through the one torch reads;
- member data starts after the local header's own name and extra fields;
- names are looked up case-insensitively by binary search over miniz's heap-sorted
  index, so of duplicate names torch reads the one that search lands on (`locate`);
- torch's archive prefix is the folder of the first central-directory entry.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
STORED, DEFLATED = 0, 8
_EOCD = struct.Struct("<4s4H2LH")  # 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # 46 bytes
_LOCAL = struct.Struct("<4s5H3L2H")  # 30 bytes
MAX_COMMENT = 0xFFFF


class ZipError(Exception):
    """torch's reader would refuse this archive."""


@dataclass(frozen=True)
class ZipMember:
    index: int  # position in the central directory
    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int

    @property
    def is_stored(self) -> bool:
        return self.method == STORED


class ZipArchive:
    def __init__(self, data, members: list[ZipMember]):
        self.data = data
        self.members = members
        self._sorted = _miniz_sort(members)

    @property
    def prefix(self) -> str:
        """torch's archive folder plus '/': the folder of the first entry."""
        if not self.members:
            raise ZipError("archive does not contain any files")
        first = self.members[0].name
        if "/" not in first:
            raise ZipError(f"file in archive is not in a subdirectory: {first[:80]}")
        return first.split("/", 1)[0] + "/"

    def locate(self, name: str) -> ZipMember | None:
        """The member miniz's mz_zip_reader_locate_file returns for `name` (case-insensitive)."""
        key = _fold(name.encode("utf-8", "surrogateescape"))
        lo, hi = 0, len(self._sorted) - 1
        while lo <= hi:
            mid = lo + ((hi - lo) >> 1)
            member = self.members[self._sorted[mid]]
            other = _fold(member.name.encode("utf-8", "surrogateescape"))
            if other == key:
                return member
            if other < key:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def same_name(self, name: str) -> list[ZipMember]:
        key = name.lower()
        return [m for m in self.members if m.name.lower() == key]

    def data_offset(self, member: ZipMember) -> int:
        start = member.header_offset
        header = bytes(self.data[start:start + _LOCAL.size])
        if len(header) != _LOCAL.size or header[:4] != LOCAL_SIG:
            raise ZipError(f"bad local header of {member.name[:80]}")
        fields = _LOCAL.unpack(header)
        offset = start + _LOCAL.size + fields[9] + fields[10]
        if offset + member.compressed_size > len(self.data):
            raise ZipError(f"{member.name[:80]} extends past the end of the file")
        return offset

    def read(self, member: ZipMember, limit: int) -> bytes:
        """The member's bytes (STORED or DEFLATED), at most `limit` of them."""
        if member.size > limit or member.compressed_size > limit:
            raise ZipError(f"{member.name[:80]} is implausibly large ({member.size} bytes)")
        offset = self.data_offset(member)
        raw = bytes(self.data[offset:offset + member.compressed_size])
        if member.method == STORED:
            return raw
        if member.method == DEFLATED:
            try:
                out = zlib.decompressobj(-15)
                data = out.decompress(raw, limit + 1)
            except zlib.error as exc:
                raise ZipError(f"cannot inflate {member.name[:80]} ({exc})") from None
            if len(data) > limit:
                raise ZipError(f"{member.name[:80]} inflates past {limit} bytes")
            return data
        raise ZipError(f"{member.name[:80]} uses compression method {member.method}")

    def read_prefix(self, member: ZipMember, n: int) -> bytes:
        """The first `n` bytes of the member (at most), inflating no more than that."""
        offset = self.data_offset(member)
        end = offset + member.compressed_size
        if member.method == STORED:
            return bytes(self.data[offset:min(end, offset + n)])
        if member.method != DEFLATED:
            raise ZipError(f"{member.name[:80]} uses compression method {member.method}")
        out, got, pos = zlib.decompressobj(-15), b"", offset
        try:
            while len(got) < n and pos < end:
                chunk = bytes(self.data[pos:min(end, pos + (64 << 10))])
                pos += len(chunk)
                got += out.decompress(chunk, n - len(got))
                if out.unconsumed_tail:
                    break
        except zlib.error as exc:
            raise ZipError(f"cannot inflate {member.name[:80]} ({exc})") from None
        return got[:n]


def _fold(name: bytes) -> bytes:
    return name.lower()  # miniz's MZ_TOLOWER: ASCII only, as bytes.lower()


def _miniz_sort(members: list[ZipMember]) -> list[int]:
    """mz_zip_reader_sort_central_dir_offsets_by_filename: the same heap sort, so equal
    (duplicate) names end up in the order miniz's binary search sees them."""
    keys = [_fold(m.name.encode("utf-8", "surrogateescape")) for m in members]
    idx = list(range(len(members)))
    size = len(idx)
    if size <= 1:
        return idx

    def less(a, b):
        return keys[a] < keys[b]

    def sift(root, end):
        while True:
            child = 2 * root + 1
            if child >= end:
                return
            if child + 1 < end and less(idx[child], idx[child + 1]):
                child += 1
            if not less(idx[root], idx[child]):
                return
            idx[root], idx[child] = idx[child], idx[root]
            root = child

    start = (size - 2) >> 1
    while True:
        sift(start, size)
        if start == 0:
            break
        start -= 1
    end = size - 1
    while end > 0:
        idx[end], idx[0] = idx[0], idx[end]
        sift(0, end)
        end -= 1
    return idx


def find_eocd(data) -> int:
    """Offset of the end-of-central-directory record as miniz finds it, or -1."""
    size = len(data)
    if size < _EOCD.size:
        return -1
    lo = max(0, size - (MAX_COMMENT + _EOCD.size))
    return data.rfind(EOCD_SIG, lo, size - _EOCD.size + 4)


def read_zip(data) -> ZipArchive:
    """Parse the central directory the way miniz does (data: bytes or mmap)."""
    size = len(data)
    eocd_at = find_eocd(data)
    if eocd_at < 0:
        raise ZipError("no end-of-central-directory record")
    (_, disk, cd_disk, entries_disk, entries, cd_size, cd_offset, _) = _EOCD.unpack(
        bytes(data[eocd_at:eocd_at + _EOCD.size]))
    if eocd_at >= _ZIP64_LOCATOR.size:
        loc = bytes(data[eocd_at - _ZIP64_LOCATOR.size:eocd_at])
        if loc[:4] == ZIP64_LOCATOR_SIG:
            _, _, z64_offset, _ = _ZIP64_LOCATOR.unpack(loc)
            rec = bytes(data[z64_offset:z64_offset + _ZIP64_EOCD.size])
            if len(rec) != _ZIP64_EOCD.size or rec[:4] != ZIP64_EOCD_SIG:
                raise ZipError("zip64 end-of-central-directory record not at its stated offset")
            (_, _, _, _, disk, cd_disk, entries_disk, entries, cd_size, cd_offset) = _ZIP64_EOCD.unpack(rec)
    if entries != entries_disk or disk > 1 or cd_disk > 1:
        raise ZipError("multi-disk archives are not supported")
    if cd_size < entries * _CENTRAL.size or cd_offset + cd_size > size:
        raise ZipError("central directory lies outside the file")
    members: list[ZipMember] = []
    pos, end = cd_offset, cd_offset + cd_size
    for index in range(entries):
        head = bytes(data[pos:pos + _CENTRAL.size])
        if len(head) != _CENTRAL.size or head[:4] != CENTRAL_SIG or pos + _CENTRAL.size > end:
            raise ZipError("central directory not at its stated offset (prepended data? torch "
                           "reads offsets as stated)")
        f = _CENTRAL.unpack(head)
        flags, method, crc, csize, usize = f[5], f[6], f[9], f[10], f[11]
        name_len, extra_len, comment_len, disk_start, header_offset = f[12], f[13], f[14], f[15], f[18]
        name_raw = bytes(data[pos + 46:pos + 46 + name_len])
        extra = bytes(data[pos + 46 + name_len:pos + 46 + name_len + extra_len])
        if 0xFFFFFFFF in (csize, usize, header_offset):
            usize, csize, header_offset = _zip64_extra(extra, usize, csize, header_offset)
        if (method == STORED and usize != csize) or (usize and not csize):
            raise ZipError(f"inconsistent sizes for {name_raw[:80]!r}")
        if disk_start == 0xFFFF or (disk_start != disk and disk_start != 1):
            raise ZipError("multi-disk archives are not supported")
        if header_offset + _LOCAL.size + csize > size:
            raise ZipError(f"{name_raw[:80]!r} lies past the end of the file")
        if flags & 1:
            raise ZipError(f"{name_raw[:80]!r} is encrypted")
        name = name_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        members.append(ZipMember(index, name, method, flags, crc, csize, usize, header_offset))
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if pos > end:
            raise ZipError("central directory entry runs past the directory")
    return ZipArchive(data, members)


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4:pos + 4 + length]
        if tag == 1:
            fields = iter(struct.unpack_from(f"<{len(body) // 8}Q", body)) if len(body) >= 8 else iter(())
            try:
                if usize == 0xFFFFFFFF:
                    usize = next(fields)
                if csize == 0xFFFFFFFF:
                    csize = next(fields)
                if offset == 0xFFFFFFFF:
                    offset = next(fields)
            except StopIteration:
                raise ZipError("truncated zip64 extra field") from None
            return usize, csize, offset
        pos += 4 + length
    raise ZipError("zip64 sizes without a zip64 extra field")
