"""Strict reader for the bundle container: a restricted POSIX ustar archive.

Bundles are ustar archives so ``tar tvf`` can list them, but the reader
accepts only a small, unambiguous subset and refuses everything else before
reading any member data:

* headers must carry the POSIX ``ustar\\0`` magic and a correct checksum;
* every numeric field has one encoding: ``width - 1`` octal digits and a NUL
  (no sign, space, underscore or base-256), so ``-1`` can never be a size;
* every header byte that carries no bundle information has one fixed value:
  mode ``0644``, uid, gid and mtime zero, empty linkname, uname, gname and
  prefix, zero device numbers, zero padding, zeros after the NUL ending a name;
* the type flag is ``0`` (a regular file), nothing else;
* no extended (pax) or GNU long-name headers;
* member names are plain names: no directory part, no ``..``, not absolute;
* members are regular files: links, device nodes, FIFOs and directories are refused;
* padding after a member, and everything after the end-of-archive marker, is zeros.

With these rules every byte of a bundle is either covered by the signature over
the manifest, by a file hash the manifest lists, fixed, or must be zero; the
names, sizes and type flags the headers carry are checked against the signed
manifest, and the checksum field has one form. So changing any byte, even with
the header checksum recomputed, makes the bundle fail verification.

The reader does no I/O of its own beyond the stream it is given and reads
member data in caller-sized chunks, so memory stays bounded whatever the
archive claims.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from .errors import (
    HeaderFieldError,
    MalformedBundleError,
    TruncatedBundleError,
    UnsafeMemberTypeError,
    UnsafePathError,
)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: at most this many zero bytes may follow the end-of-archive marker (tar pads to 10 KiB)
MAX_TRAILER = 64 * 1024

_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device node",
    b"4": "block device node",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
}


@dataclass(frozen=True)
class MemberHeader:
    name: str
    size: int
    offset: int  # offset of the member's data in the stream


class ByteSource:
    """Exact reads over a binary stream, counting the position."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.position = 0

    def read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.readinto_exact(memoryview(buf), what)
        return bytes(buf)

    def readinto_exact(self, view: memoryview, what: str) -> None:
        got = 0
        total = len(view)
        while got < total:
            n = self._stream.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise TruncatedBundleError(
                    f"bundle ends early while reading {what} (at byte {self.position + got}); "
                    "the file is incomplete: download or copy it again"
                )
            got += n
        self.position += total

    def read_some(self, n: int) -> bytes:
        data = self._stream.read(n)
        self.position += len(data)
        return data


#: fixed bytes of fields that carry no information in a bundle (offset, value, what)
_FIXED_FIELDS: tuple[tuple[int, bytes, str], ...] = (
    (100, b"0000644\0", "mode (must be 0644: no setuid, setgid or exec bits)"),
    (108, b"0000000\0", "uid (must be 0)"),
    (116, b"0000000\0", "gid (must be 0)"),
    (136, b"00000000000\0", "mtime (must be 0)"),
)
#: byte ranges that must be all zero (offset, end, what)
_ZERO_FIELDS: tuple[tuple[int, int, str], ...] = (
    (157, 257, "linkname"),
    (265, 297, "uname"),
    (297, 329, "gname"),
    (345, 500, "prefix"),
    (500, 512, "header padding"),
)
#: device numbers of a regular file: zero, as all zero bytes (Python >= 3.10 tarfile, GNU
#: tar) or as the octal-zero field older writers put there; nothing else
_ZERO_DEVICE = (bytes(8), b"0000000\0")


def _octal(field: bytes, what: str) -> int:
    """Decode a numeric header field in its one accepted encoding.

    The field is ``len(field) - 1`` octal digits followed by one NUL, exactly as
    ``tarfile`` and ``edgefleet bundle pack`` write it. Signs, underscores,
    spaces, a missing terminator and base-256 (high bit set) are refused: each
    would give one number several byte encodings, and ``int(text, 8)`` accepts
    ``-1``, ``+7`` and ``0_7``.
    """
    digits, end = field[:-1], field[-1:]
    if end != b"\0" or not digits or not all(0x30 <= c <= 0x37 for c in digits):
        raise HeaderFieldError(
            f"{what} is {field!r}; bundle headers hold exactly {len(field) - 1} octal digits "
            "and a NUL (no sign, space, underscore or base-256). The bundle was altered or "
            "not written by `edgefleet bundle pack`; refusing it"
        )
    return int(digits, 8)


def _check_fixed_fields(block: bytes, offset: int, name: str) -> None:
    """Every header byte that is not a name, size, type or checksum has one fixed value."""
    where = f"header of member {name!r} at byte {offset}"
    for start, value, what in _FIXED_FIELDS:
        if block[start : start + len(value)] != value:
            raise HeaderFieldError(
                f"{where}: field {what} is {block[start : start + len(value)]!r}, expected "
                f"{value!r}; bundles carry no file metadata, so the bundle was altered"
            )
    for start, end, what in _ZERO_FIELDS:
        if block[start:end] != bytes(end - start):
            raise HeaderFieldError(
                f"{where}: field {what} (bytes {start}-{end - 1}) must be zeros; the bundle "
                "was altered"
            )
    for start in (329, 337):
        if block[start : start + 8] not in _ZERO_DEVICE:
            raise HeaderFieldError(
                f"{where}: device number field at byte {start} is "
                f"{block[start : start + 8]!r}, expected zero; the bundle was altered"
            )


def check_member_name(raw: str) -> str:
    """Refuse absolute names, ``..``, directory parts and control characters."""
    if (
        not raw
        or raw.startswith("/")
        or raw.startswith("\\")
        or "/" in raw
        or "\\" in raw
        or raw in (".", "..")
        or ".." in raw.split("/")
        or any(ord(c) < 32 for c in raw)
        or (len(raw) > 1 and raw[1] == ":")
    ):
        raise UnsafePathError(
            f"bundle member {raw!r} is not a plain file name (absolute path, '..' or a "
            "directory part); this bundle may be trying to write outside its install "
            "directory and is refused"
        )
    return raw


def parse_header(block: bytes, offset: int) -> MemberHeader | None:
    """Parse one 512-byte header; None means the end-of-archive marker."""
    if block == _ZERO_BLOCK:
        return None
    field = block[148:156]
    # exactly the form tar writers use ("%06o\0 "), so the field has one encoding
    if field[6:8] != b"\0 " or not all(0x30 <= c <= 0x37 for c in field[:6]):
        raise MalformedBundleError(
            f"header at byte {offset} has a malformed checksum field; the bundle is corrupted"
        )
    stored = int(field[:6], 8)
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise MalformedBundleError(
            f"header at byte {offset} has a wrong checksum; the bundle is corrupted or was "
            "tampered with. Fetch it again"
        )
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise MalformedBundleError(
            f"header at byte {offset} is not a POSIX ustar header; bundles must be written "
            "with `edgefleet bundle pack`"
        )
    typeflag = block[156:157]
    if typeflag in (b"x", b"g", b"L", b"K"):
        raise MalformedBundleError(
            f"header at byte {offset} is an extended (pax/GNU) header; bundle format v1 "
            "does not allow them"
        )
    raw_name, _, after = block[0:100].partition(b"\0")
    try:
        name = raw_name.decode("utf-8")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedBundleError(f"header at byte {offset} has a non-UTF-8 name") from e
    full = f"{prefix}/{name}" if prefix else name
    check_member_name(full)
    if after != bytes(len(after)):
        raise HeaderFieldError(
            f"header of member {full!r} at byte {offset} has bytes after the NUL that ends "
            "its name; they must be zeros. The bundle was altered"
        )
    if typeflag != b"0":
        kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
        raise UnsafeMemberTypeError(
            f"bundle member {full!r} is a {kind}, not a regular file; bundles may only "
            "contain regular files, so this one is refused"
        )
    _check_fixed_fields(block, offset, full)
    size = _octal(block[124:136], f"size field of member {full!r} at byte {offset}")
    return MemberHeader(name=full, size=size, offset=offset + BLOCK)


def iter_headers(src: ByteSource, max_members: int) -> Iterator[MemberHeader]:
    """Yield member headers. The caller must consume each member's data and
    padding (via :func:`skip_padding`) before asking for the next header."""
    count = 0
    while True:
        offset = src.position
        block = src.read_exact(BLOCK, "a member header")
        header = parse_header(block, offset)
        if header is None:
            _check_trailer(src)
            return
        count += 1
        if count > max_members:
            raise MalformedBundleError(f"bundle has more than {max_members} members")
        yield header


def padding_size(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK


def skip_padding(src: ByteSource, size: int, name: str) -> None:
    pad = padding_size(size)
    if pad and src.read_exact(pad, f"padding after {name!r}") != bytes(pad):
        raise MalformedBundleError(
            f"padding after member {name!r} is not zeros; the bundle was altered"
        )


def _check_trailer(src: ByteSource) -> None:
    second = src.read_exact(BLOCK, "the end-of-archive marker")
    if second != _ZERO_BLOCK:
        raise MalformedBundleError("end-of-archive marker is damaged; the bundle was altered")
    seen = 0
    while True:
        chunk = src.read_some(BLOCK * 8)
        if not chunk:
            return
        seen += len(chunk)
        if seen > MAX_TRAILER or chunk.count(0) != len(chunk):
            raise MalformedBundleError(
                "data after the end of the bundle; the file was altered or concatenated"
            )


class MemberReader(io.RawIOBase):
    """The data of one member, read through the strict reader (at most ``size`` bytes)."""

    def __init__(self, src: ByteSource, header: MemberHeader) -> None:
        self._src = src
        self.header = header
        self.left = header.size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self.left)
        if n == 0:
            return 0
        self._src.readinto_exact(view[:n], f"member {self.header.name!r}")
        self.left -= n
        return n

    def skip(self) -> None:
        """Read past whatever the consumer left unread."""
        while self.left:
            self.read(min(self.left, 1 << 20))


def iter_members(stream: BinaryIO, max_members: int = 64) -> Iterator[MemberReader]:
    """Every member of a bundle through the strict reader (headers, padding and trailer
    checked as in verification), each as a reader of its data. Nothing is verified
    against a signature: use :func:`device_agent.bundle.verify_file` for that. A member's
    unread data is skipped when the next one is asked for."""
    src = ByteSource(stream)
    for header in iter_headers(src, max_members):
        reader = MemberReader(src, header)
        yield reader
        reader.skip()
        skip_padding(src, header.size, header.name)
