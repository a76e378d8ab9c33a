"""The one ELF reader: cores, programs, libraries, debug files and ``.dwz`` files.

Every part reads ELF through :class:`ElfFile`: the intake to tell a core and its
architecture, the analyzer for a core's extent, a program's dynamic loader and a
debug file's ``.gnu_debugaltlink``, and the mirror to index the build-id note of
every ELF file inside an RPM (:func:`scan`), which arrives as a stream: its head
(headers and notes) and its section header table (usually at the end) are kept
as they pass, and nothing else is held.

Our own parser rather than pyelftools: these are a dozen fixed-layout structures,
and ``bench/readers`` measured the stream scan here against pyelftools reading
the same files (README, performance section).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
PT_LOAD, PT_INTERP, PT_NOTE = 1, 3, 4
SHT_PROGBITS, SHT_NOTE, SHT_NOBITS = 1, 7, 8
SHF_EXECINSTR = 0x4
NT_GNU_BUILD_ID = 3
MAX_BUILD_ID = 64
HEAD = 64 * 1024
"""Bytes of a streamed file kept for its headers and notes: build-id notes sit in the
first pages of every program, library, debug and ``.dwz`` file that tools write."""
MAX_TABLE = 1 << 20
"""A program or section header table larger than this is not one a tool wrote."""

# e_machine values (from elf.h) for the architectures Fedora builds, by our arch name.
MACHINES = {
    62: "x86_64",
    183: "aarch64",
    21: "ppc64le",  # EM_PPC64; the byte order tells ppc64le from ppc64
    22: "s390x",
    243: "riscv64",
    3: "i686",
    40: "armv7hl",
}
DWZ_DIR = "usr/lib/debug/.dwz/"


class NotElf(ValueError):
    """The file is not an ELF file this reader understands; the message says why."""


class NotACore(NotElf):
    """The file is not an ELF core dump; the message says what it is instead."""


class ElfKind(StrEnum):
    """What an ELF file inside a package is, for the build-id index."""

    BINARY = "binary"
    """A program or library: the file gdb loads and unwinds through."""
    DEBUG = "debug"
    """A separate debug file: DWARF and symbols, its code sections empty."""
    DWZ = "dwz"
    """Shared DWARF that debug files of a build point to (``/usr/lib/debug/.dwz/``)."""


@dataclass(frozen=True)
class Segment:
    """One program header."""

    type: int
    offset: int
    filesz: int


@dataclass(frozen=True)
class Section:
    """One section header (its name offset into the section name table)."""

    name_at: int
    type: int
    flags: int
    offset: int
    size: int
    align: int


@dataclass(frozen=True)
class AltLink:
    """A debug file's reference to shared DWARF (``.gnu_debugaltlink``)."""

    path: str  # as written in the section, relative to the debug file's folder
    build_id: str


class _Reader(Protocol):
    def __call__(self, offset: int, size: int, /) -> bytes: ...


class ElfFile:
    """An ELF file's headers, read through ``read(offset, size)``.

    ``read`` may return fewer bytes than asked where the data is not there (a
    truncated file, or a part of a stream that was not kept); the parser treats
    that as "not available", never as an error of its own.
    """

    def __init__(self, read: _Reader, name: str = "the file") -> None:
        self._read = read
        self.name = name
        ident = read(0, 64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            raise NotElf(f"{name} is not an ELF file")
        self.wide = ident[4] == 2
        order = {1: "<", 2: ">"}.get(ident[5])
        if ident[4] not in (1, 2) or order is None:
            raise NotElf(f"{name} has an invalid ELF class or byte order")
        self.order = order
        self.type, self.machine = struct.unpack_from(order + "HH", ident, 16)
        if self.wide:
            if len(ident) < 64:
                raise NotElf(f"{name} is cut off inside its ELF header")
            self.phoff, self.shoff = struct.unpack_from(order + "QQ", ident, 32)
            layout = struct.unpack_from(order + "HHHHH", ident, 54)
        else:
            self.phoff, self.shoff = struct.unpack_from(order + "II", ident, 28)
            layout = struct.unpack_from(order + "HHHHH", ident, 42)
        self.phentsize, self.phnum, self.shentsize, self.shnum, self.shstrndx = layout

    @classmethod
    def of_file(cls, f: BinaryIO, name: str = "the file") -> ElfFile:
        """An ELF file read from the seekable file ``f``."""

        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        return cls(read, name)

    @property
    def arch(self) -> str | None:
        """The architecture by our name (``x86_64``), or ``None`` for one we do not know."""
        arch = MACHINES.get(self.machine)
        if arch == "ppc64le" and self.order == ">":
            return "ppc64"
        return arch

    @property
    def program_table_end(self) -> int:
        """Where the program header table ends."""
        return int(self.phoff + self.phentsize * self.phnum)

    def segments(self) -> list[Segment]:
        """The program headers (fewer if the table is cut off)."""
        size = self.phentsize * self.phnum
        if not self.phnum or size > MAX_TABLE:
            return []
        table = self._read(self.phoff, size)
        if self.wide:
            fields, at = self.order + "IIQQQQ", (0, 2, 5)  # p_type, p_offset, p_filesz
        else:
            fields, at = self.order + "IIIIII", (0, 1, 4)
        width = struct.calcsize(fields)
        if self.phentsize < width:
            return []
        segments = []
        for start in range(0, len(table) - width + 1, self.phentsize):
            values = struct.unpack_from(fields, table, start)
            segments.append(Segment(values[at[0]], values[at[1]], values[at[2]]))
        return segments

    def sections(self) -> list[Section]:
        """The section headers; empty when the file has none or they are not available."""
        size = self.shentsize * self.shnum
        if not self.shoff or not self.shnum or size > MAX_TABLE:
            return []
        table = self._read(self.shoff, size)
        if len(table) < size:
            return []
        if self.wide:
            fields, at = self.order + "IIQQQQIIQQ", (0, 1, 2, 4, 5, 8)
        else:
            fields, at = self.order + "IIIIIIIIII", (0, 1, 2, 4, 5, 8)
        width = struct.calcsize(fields)
        if self.shentsize < width:
            return []
        sections = []
        for start in range(0, size, self.shentsize):
            v = struct.unpack_from(fields, table, start)
            sections.append(Section(v[at[0]], v[at[1]], v[at[2]], v[at[3]], v[at[4]], v[at[5]]))
        return sections

    def section(self, name: str) -> Section | None:
        """The section called ``name``, if the file has one and its names are readable."""
        sections = self.sections()
        if not 0 < self.shstrndx < len(sections):
            return None
        names = sections[self.shstrndx]
        table = self._read(names.offset, min(names.size, MAX_TABLE))
        wanted = name.encode() + b"\0"
        for section in sections:
            if table[section.name_at : section.name_at + len(wanted)] == wanted:
                return section
        return None

    def data(self, section: Section) -> bytes:
        """A section's bytes (none for a ``NOBITS`` section)."""
        if section.type == SHT_NOBITS:
            return b""
        return self._read(section.offset, min(section.size, MAX_TABLE))

    def build_id(self) -> str | None:
        """The GNU build-id note, from the note segments or else the note sections."""
        places = [(s.offset, s.filesz, 4) for s in self.segments() if s.type == PT_NOTE]
        places += [
            (s.offset, s.size, max(4, s.align)) for s in self.sections() if s.type == SHT_NOTE
        ]
        for offset, size, align in places:
            notes = self._read(offset, min(size, MAX_TABLE))
            for kind, name, desc in _notes(notes, self.order, align):
                if kind == NT_GNU_BUILD_ID and name == b"GNU" and 0 < len(desc) <= MAX_BUILD_ID:
                    return desc.hex()
        return None

    def segment_notes(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Every note of the note segments, as (type, name, description)."""
        for segment in self.segments():
            if segment.type == PT_NOTE:
                data = self._read(segment.offset, min(segment.filesz, MAX_TABLE))
                yield from _notes(data, self.order, 4)

    def interpreter(self) -> str | None:
        """The dynamic loader a program names (its ``PT_INTERP``)."""
        for segment in self.segments():
            if segment.type == PT_INTERP:
                data = self._read(segment.offset, min(segment.filesz, 4096))
                return data.rstrip(b"\0").decode(errors="replace") or None
        return None

    def altlink(self) -> AltLink | None:
        """The ``.gnu_debugaltlink`` of a debug file, if it has one."""
        section = self.section(".gnu_debugaltlink")
        if section is None:
            return None
        path, _, build_id = self.data(section).partition(b"\0")
        return AltLink(path.decode(errors="replace"), build_id.hex())

    def described_size(self) -> int:
        """How many bytes the program headers say the file holds (a core's notes and memory)."""
        end = self.program_table_end
        for segment in self.segments():
            end = max(end, segment.offset + segment.filesz)
        return end

    def kind(self, path: str) -> ElfKind | None:
        """What this file is in a package, by its content (and the ``.dwz`` folder).

        ``None`` for a file the index has no use for: a core, a relocatable object.
        """
        if path.lstrip("/").startswith(DWZ_DIR):
            return ElfKind.DWZ
        if self.type not in (ET_EXEC, ET_DYN):
            return None
        code = [s for s in self.sections() if s.flags & SHF_EXECINSTR]
        if code and all(s.type == SHT_NOBITS for s in code):
            return ElfKind.DEBUG
        return ElfKind.BINARY


def _notes(data: bytes, order: str, align: int) -> Iterator[tuple[int, bytes, bytes]]:
    at = 0
    while at + 12 <= len(data):
        name_size, desc_size, kind = struct.unpack_from(order + "III", data, at)
        at += 12
        name = data[at : at + name_size].rstrip(b"\0")
        at += -(-name_size // align) * align
        desc = data[at : at + desc_size]
        at += -(-desc_size // align) * align
        if len(desc) < desc_size:
            return
        yield kind, name, desc


def open_elf(path: Path) -> ElfFile:
    """The ELF file at ``path``, read whole into memory only as far as asked.

    The file is opened for each read, so nothing stays open; use it for headers
    and small sections.
    """

    def read(offset: int, size: int) -> bytes:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    return ElfFile(read, path.name)


def core_arch(path: Path) -> str:
    """The architecture of the ELF core dump at ``path``.

    Raises :class:`NotACore` when the file is not an ELF core or its machine is unknown.
    """
    try:
        elf = open_elf(path)
    except NotElf as exc:
        raise NotACore("it is not an ELF file") from exc
    if elf.type != ET_CORE:
        raise NotACore(f"it is an ELF file of type {elf.type}, not a core dump")
    arch = elf.arch
    if arch is None:
        raise NotACore(f"its machine type {elf.machine} is not one Retrace Server knows")
    return arch


def build_id_of(path: Path) -> str | None:
    """The build-id of the ELF file at ``path``; ``None`` when it has none or is not ELF."""
    try:
        return open_elf(path).build_id()
    except (NotElf, OSError):
        return None


@dataclass(frozen=True)
class Scanned:
    """What the index records of one ELF file found in a package's payload."""

    build_id: str
    kind: ElfKind


class _Stream(Protocol):
    size: int

    def read(self, size: int = -1, /) -> bytes: ...


def scan(member: _Stream, path: str) -> Scanned | None:
    """The build-id and kind of an ELF file read once as a stream (a payload member).

    Reads the whole member (it has to pass anyway) but keeps only its head and its
    section header table.  ``None`` when it is not ELF, has no build-id, or is of no
    kind the index keeps.
    """
    head = member.read(HEAD)
    if head[:4] != b"\x7fELF":
        return None
    kept: dict[int, bytes] = {0: head}
    position = len(head)
    try:
        probe = ElfFile(_from_pieces(kept), path)
    except NotElf:
        return None
    table = (probe.shoff, probe.shentsize * probe.shnum)
    while position < member.size:
        chunk = member.read(min(1 << 20, member.size - position))
        if not chunk:
            break
        start, length = table
        if start < position + len(chunk) and position < start + length and length <= MAX_TABLE:
            low = max(start, position)
            high = min(start + length, position + len(chunk))
            kept[low] = chunk[low - position : high - position]
        position += len(chunk)
    elf = ElfFile(_from_pieces(kept), path)
    build_id = elf.build_id()
    kind = elf.kind(path)
    if build_id is None or kind is None:
        return None
    return Scanned(build_id, kind)


def _from_pieces(pieces: dict[int, bytes]) -> Callable[[int, int], bytes]:
    """A ``read`` over the kept pieces of a stream; whatever was not kept reads as empty."""

    def read(offset: int, size: int) -> bytes:
        out = b""
        want = offset
        for start in sorted(pieces):
            data = pieces[start]
            if start <= want < start + len(data):
                piece = data[want - start : want - start + (offset + size - want)]
                out += piece
                want += len(piece)
                if want >= offset + size:
                    break
        return out

    return read
