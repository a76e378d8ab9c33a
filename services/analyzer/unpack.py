"""Unpacking an RPM in this process: no ``rpm2cpio``, no ``cpio``.

The root cache unpacks each RPM a task needs the first time it sees it.  Most
packages hold a handful of files, so two process starts per RPM (``rpm2cpio |
cpio``) cost more than the unpacking itself; and on a disk where making a file,
folder or link costs far more than a hard link, making every folder and link
once in the cache and again in the root doubles the work.  Here the file is read
directly:

- the lead (96 bytes) and the signature header are skipped; of the main header
  only the payload's format and compressor, the package's size and its number of
  paths are read (the size bounds what the payload may unpack to);
- the rest of the file is the payload: a cpio archive in the "new ASCII" (newc)
  format, compressed with one of the compressors rpm writes (zstd, as Fedora
  builds do; xz, lzma, gzip, bzip2; or none);
- each regular file's data is written once, flat, to the destination; the paths,
  folders and links come back as a list of :class:`Entry`.

The RPMs come from the mirror, which checked them against Koji, but they are
still treated as input: the file's sha256 must be the one the mirror recorded,
cpio headers must be plain hex, names are made relative and ``..`` is refused
(nothing is written under a name from the archive), set-id bits are dropped;
devices, FIFOs, odd links, over-long names and over-deep paths are skipped,
each with a warning.
Payloads this reader does not know (rpm's format for files over 4 GiB) fail
with a :class:`PayloadError` that names the RPM and the reason.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import stat
import struct
import zlib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import zstandard

LEAD_SIZE = 96
LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
# rpm's own sanity limits for a header (hdrchkTags, hdrchkData).
MAX_HEADER_TAGS = 0x00FFFF
MAX_HEADER_DATA = 256 << 20
TAG_PAYLOADFORMAT = 1124
TAG_PAYLOADCOMPRESSOR = 1125
TAG_SIZE = 1009
TAG_BASENAMES = 1117
TAG_LONGSIZE = 5009
_WANTED_TAGS = (TAG_PAYLOADFORMAT, TAG_PAYLOADCOMPRESSOR, TAG_SIZE, TAG_LONGSIZE, TAG_BASENAMES)
TYPE_INT32 = 4
TYPE_INT64 = 5
TYPE_STRING = 6
GZIP_MAGIC = b"\x1f\x8b"

CPIO_HEADER = 110
CPIO_MAGICS = (b"070701", b"070702")
STRIPPED_MAGIC = b"07070X"
TRAILER = "TRAILER!!!"
MAX_NAME = 4096
NAME_MAX = 255
MAX_DEPTH = 128
"""Folders a path may lie in: Fedora's deepest are a few dozen; far deeper trees defeat
recursive tools (``shutil.rmtree`` among them) that later remove roots."""
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")
CHUNK = 1 << 20
# Readable by the sandbox's user, never set-id, never writable by others.
FILE_MODE_MASK = 0o755
# What the decompressors raise on a damaged stream (gzip's BadGzipFile is an OSError).
_DECOMPRESSION_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)


class PayloadError(ValueError):
    """The RPM cannot be unpacked; the message names it and says why."""


DIR = "d"
FILE = "f"
LINK = "l"


@dataclass(frozen=True)
class Entry:
    """One path the RPM installs."""

    kind: str
    """:data:`DIR`, :data:`FILE` or :data:`LINK`."""
    path: str
    """Relative to ``/``, ``/``-separated, never ``.`` or ``..`` among its parts."""
    value: str = ""
    """A file's data: the name of its file in the destination; a link's target."""


@dataclass
class Unpacked:
    """What :func:`unpack_rpm` found and wrote."""

    entries: list[Entry] = field(default_factory=list)
    size: int = 0
    """Bytes of file data and link targets."""
    files: int = 0
    """Files written to the destination (the names of a hard-linked set share one)."""
    warnings: list[str] = field(default_factory=list)


def shown(path: str) -> str:
    """``path`` for a message: bytes that are not UTF-8 written as escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def unpack_rpm(rpm: Path, dest: Path, sha256: str | None = None) -> Unpacked:
    """Read the RPM at ``rpm``: its paths, and its files' data written to ``dest``.

    ``dest`` (an empty folder) stays flat: the data of the n-th file is written to
    ``dest/<n>`` with the file's permissions and time; folders and links exist
    only as :class:`Entry` values.  Laying the paths out is for the caller, which
    can then place them straight where they belong (a root is built of hard links
    to these files), so that no folder or link is made twice.  With ``sha256``,
    the whole file must have that digest (the one the mirror recorded) or the
    unpacking fails; the caller then discards what was written.
    """
    try:
        opened = rpm.open("rb")
    except OSError as error:
        raise PayloadError(f"{rpm.name} cannot be opened: {error.strerror}") from error
    with opened as raw:
        source = _Source(raw)
        payload = _read_payload_header(source, rpm.name)
        with _decompressed(source, payload.compressor, rpm.name) as stream:
            archive = _Archive(stream, rpm.name, payload.limit)
            unpacked = _Extractor(archive, dest).run()
            archive.drain()  # to the end, where gzip, xz and bzip2 check their sums
        digest = source.digest_of_all()
    if sha256 is not None and digest != sha256:
        raise PayloadError(
            f"{rpm.name} is not the file the mirror recorded: its sha256 is {digest}, not {sha256}"
        )
    return unpacked


class _Source:
    """The RPM file as it is read: hashed on the way, with room to put back a peek."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._sha256 = hashlib.sha256()
        self._back = b""

    def read(self, size: int = -1, /) -> bytes:
        if self._back:
            data = self._back if size < 0 else self._back[:size]
            self._back = self._back[len(data) :]
            return data
        data = self._raw.read(size)
        self._sha256.update(data)
        return data

    def peek(self, size: int) -> bytes:
        data = self.read(size)
        self._back = data + self._back
        return data

    def digest_of_all(self) -> str:
        """The sha256 of the whole file, reading what the payload left."""
        while self.read(CHUNK):
            pass
        return self._sha256.hexdigest()


@dataclass(frozen=True)
class _Payload:
    """What the header says of the payload."""

    compressor: str
    size: int
    """Bytes of file data and link targets the package installs (hard links once)."""
    paths: int
    """Paths the package lists."""

    @property
    def limit(self) -> int:
        """The most bytes a payload of this package can hold, headers and padding included."""
        return self.size + (self.paths + 1) * (CPIO_HEADER + MAX_NAME + 8) + CHUNK


def _read_payload_header(source: _Source, name: str) -> _Payload:
    lead = source.read(LEAD_SIZE)
    if len(lead) != LEAD_SIZE or lead[:4] != LEAD_MAGIC:
        raise PayloadError(f"{name} is not an RPM: it does not start with an RPM lead")
    _read_header(source, name, "signature header", aligned=True)
    header = _read_header(source, name, "header", aligned=False)
    payload_format = header.strings.get(TAG_PAYLOADFORMAT, "cpio")
    if payload_format != "cpio":
        raise PayloadError(f"{name}: the payload format is {payload_format!r}, not cpio")
    size = header.numbers.get(TAG_LONGSIZE, header.numbers.get(TAG_SIZE))
    if size is None:
        raise PayloadError(f"{name}: the header does not say how large the package is")
    paths = header.counts.get(TAG_BASENAMES, 0)
    if TAG_PAYLOADCOMPRESSOR in header.strings:
        return _Payload(header.strings[TAG_PAYLOADCOMPRESSOR], size, paths)
    # Without the tag rpm reads the payload as gzip, and zlib passes data that is
    # not gzip through as it is: w.ufdio packages are written that way.
    compressor = "gzip" if source.peek(2) == GZIP_MAGIC else "identity"
    return _Payload(compressor, size, paths)


@dataclass
class _Header:
    strings: dict[int, str] = field(default_factory=dict)
    numbers: dict[int, int] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


def _read_header(raw: _Source, name: str, what: str, *, aligned: bool) -> _Header:
    """Read one header structure; keep the few tags unpacking needs."""
    intro = raw.read(16)
    if len(intro) != 16 or intro[:4] != HEADER_MAGIC:
        raise PayloadError(f"{name}: the {what} is missing or damaged")
    tags, data_size = struct.unpack(">II", intro[8:])
    if tags > MAX_HEADER_TAGS or data_size > MAX_HEADER_DATA:
        raise PayloadError(f"{name}: the {what} claims {tags} tags and {data_size} bytes")
    index = raw.read(16 * tags)
    data = raw.read(data_size)
    if len(index) != 16 * tags or len(data) != data_size:
        raise PayloadError(f"{name}: the file ends inside its {what}")
    if aligned:
        raw.read(-(16 + 16 * tags + data_size) % 8)
    header = _Header()
    for tag, kind, offset, count in struct.iter_unpack(">IIII", index):
        if tag not in _WANTED_TAGS:
            continue
        header.counts[tag] = count
        if kind == TYPE_STRING and tag in (TAG_PAYLOADFORMAT, TAG_PAYLOADCOMPRESSOR):
            end = data.find(b"\0", offset)
            if offset >= data_size or end < 0:
                raise PayloadError(f"{name}: tag {tag} of the {what} points outside it")
            header.strings[tag] = data[offset:end].decode("ascii", "replace")
        elif (kind, tag) in ((TYPE_INT32, TAG_SIZE), (TYPE_INT64, TAG_LONGSIZE)):
            width = 4 if kind == TYPE_INT32 else 8
            if offset + width > data_size:
                raise PayloadError(f"{name}: tag {tag} of the {what} points outside it")
            header.numbers[tag] = int.from_bytes(data[offset : offset + width], "big")
    return header


def _decompressed(source: _Source, compressor: str, name: str) -> AbstractContextManager[_Readable]:
    raw = cast(BinaryIO, source)  # the decompressors only ever call read()
    match compressor:
        case "zstd":
            # Several frames may follow one another (rpm's multi-threaded writer).
            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        case "xz" | "lzma":
            return lzma.LZMAFile(raw)
        case "gzip":
            return gzip.GzipFile(fileobj=raw, mode="rb")
        case "bzip2":
            return bz2.BZ2File(raw)
        case "identity":
            return nullcontext(source)
    raise PayloadError(f"{name}: the payload compressor {compressor!r} is not supported")


class _Archive:
    """The decompressed payload, read in exact amounts; tracks cpio's 4-byte alignment."""

    def __init__(self, stream: _Readable, name: str, limit: int) -> None:
        self._stream = stream
        self._position = 0
        self._limit = limit
        self.name = name

    def read(self, size: int) -> bytes:
        if not 0 <= size <= self._limit - self._position:
            raise self._too_large()
        first = self._decompress(size)
        if len(first) == size:
            self._position += size
            return first
        chunks = [first]
        missing = size - len(first)
        while missing:
            chunk = self._decompress(missing)
            if not chunk:
                raise PayloadError(f"{self.name}: the payload ends in the middle of an entry")
            chunks.append(chunk)
            missing -= len(chunk)
        self._position += size
        return b"".join(chunks)

    def _decompress(self, size: int) -> bytes:
        try:
            return self._stream.read(size)
        except _DECOMPRESSION_ERRORS as error:
            raise PayloadError(f"{self.name}: the payload cannot be read: {error}") from error

    def align(self) -> None:
        pad = -self._position % 4
        if pad:
            self.read(pad)

    def copy(self, size: int, out: BinaryIO) -> None:
        while size:
            chunk = self.read(min(size, CHUNK))
            out.write(chunk)
            size -= len(chunk)

    def drain(self) -> None:
        while chunk := self._decompress(CHUNK):
            self._position += len(chunk)
            if self._position > self._limit:
                raise self._too_large()

    def _too_large(self) -> PayloadError:
        return PayloadError(
            f"{self.name}: the payload holds more than its header declares "
            f"({self._limit} bytes at most)"
        )

    def skip(self, size: int) -> None:
        while size:
            size -= len(self.read(min(size, CHUNK)))


class _Skip(Exception):
    """This entry is left out; the message says why."""


class _Extractor:
    def __init__(self, archive: _Archive, dest: Path) -> None:
        self._archive = archive
        self._dest = str(dest)
        self._result = Unpacked()
        # Hard links: rpm writes the data with one name of the set and none with the others.
        self._linked_data: dict[int, str] = {}
        self._linked_waiting: dict[int, list[tuple[str, int, int]]] = {}

    def run(self) -> Unpacked:
        while (header := self._next()) is not None:
            path, mode, inode, links, mtime, size = header
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFDIR:
                self._result.entries.append(Entry(DIR, path))
                self._archive.skip(size)
            elif kind == stat.S_IFLNK:
                self._link(path, size)
            elif kind == stat.S_IFREG:
                self._file(path, mode, inode, links, mtime, size)
            else:
                self._warn(path, "is a device, FIFO or socket; skipped")
                self._archive.skip(size)
            self._archive.align()
        for names in self._linked_waiting.values():  # a set whose files are all empty
            _, mode, mtime = names[0]
            data = self._write_data(mode, mtime, 0)
            self._result.entries += [Entry(FILE, name, data) for name, _, _ in names]
        return self._result

    def _link(self, path: str, size: int) -> None:
        if size > MAX_NAME:
            self._warn(path, f"is a link with a {size}-byte target; skipped")
            self._archive.skip(size)
            return
        target = self._archive.read(size)
        if target and b"\0" not in target:
            self._result.entries.append(Entry(LINK, path, os.fsdecode(target)))
            self._result.size += size
        else:
            self._warn(path, "is a link with an empty or NUL-bearing target; skipped")

    def _file(self, path: str, mode: int, inode: int, links: int, mtime: int, size: int) -> None:
        if links > 1 and size == 0:
            data = self._linked_data.get(inode)
            if data is None:
                self._linked_waiting.setdefault(inode, []).append((path, mode, mtime))
            else:
                self._result.entries.append(Entry(FILE, path, data))
            return
        data = self._write_data(mode, mtime, size)
        self._result.entries.append(Entry(FILE, path, data))
        if links > 1:
            self._linked_data[inode] = data
            for waiting, _, _ in self._linked_waiting.pop(inode, []):
                self._result.entries.append(Entry(FILE, waiting, data))

    def _warn(self, path: str, text: str) -> None:
        self._result.warnings.append(f"{self._archive.name}: /{shown(path)} {text}")

    def _next(self) -> tuple[str, int, int, int, int, int] | None:
        """The next entry's path, mode, inode, link count, mtime and size; None at the end."""
        archive = self._archive
        while True:
            header = archive.read(CPIO_HEADER)
            if header[:6] not in CPIO_MAGICS:
                if header[:6] == STRIPPED_MAGIC:
                    raise PayloadError(
                        f"{archive.name}: the payload uses rpm's format for files over 4 GiB, "
                        "which this analyzer does not read"
                    )
                raise PayloadError(f"{archive.name}: the payload is not a cpio (newc) archive")
            if not _HEX_FIELDS.fullmatch(header[6:]):
                raise PayloadError(f"{archive.name}: a cpio header is damaged")
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
            inode, mode, _, _, links, mtime, size, *_, name_size, _ = fields
            if not 1 <= name_size <= MAX_NAME:
                raise PayloadError(f"{archive.name}: a cpio entry has a {name_size}-byte name")
            raw_name = archive.read(name_size)
            archive.align()
            if raw_name[-1:] != b"\0" or b"\0" in raw_name[:-1]:
                raise PayloadError(f"{archive.name}: a cpio entry's name is not terminated")
            name = os.fsdecode(raw_name[:-1])
            if name == TRAILER:
                return None
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if ".." in parts:
                self._warn(name.lstrip("./"), "climbs out with ..; skipped")
            elif any(len(os.fsencode(part)) > NAME_MAX for part in parts):
                self._warn(name.lstrip("./"), f"has a name part over {NAME_MAX} bytes; skipped")
            elif len(parts) > MAX_DEPTH:
                self._warn(name.lstrip("./"), f"lies deeper than {MAX_DEPTH} folders; skipped")
            elif parts:  # not the archive's own top folder
                return "/".join(parts), mode, inode, links, mtime, size
            archive.skip(size)
            archive.align()

    def _write_data(self, mode: int, mtime: int, size: int) -> str:
        name = str(self._result.files)
        with open(f"{self._dest}/{name}", "xb") as out:  # noqa: PTH123 -- strings, hot path
            self._archive.copy(size, out)
            out.flush()
            os.fchmod(out.fileno(), (mode & FILE_MODE_MASK) | stat.S_IRUSR)
            os.utime(out.fileno(), (mtime, mtime))
        self._result.size += size
        self._result.files += 1
        return name
