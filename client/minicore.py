"""Minimal cores: a core dump rewritten to hold what a retrace needs, and nothing else.

A retrace reads a core's notes (registers, auxv, the list of mapped files, the
signal), each thread's stack, the ELF headers and build-id notes at the start of
the mapped modules, the modules' data (``.data``, the GOT), the dynamic loader's
list of libraries and the thread descriptors.  Everything else, heaps above all,
is the program's data.  :func:`minimize` writes a new, valid ELF core that keeps

- the note segment, byte for byte;
- each thread's stack, from its stack pointer minus ``red_zone`` bytes up to the
  end of the stack's mapping (the main thread's holds the program's arguments and
  environment at its top); stacks are never cut by ``max_anonymous``;
- the first page of every file-backed mapping, as the kernel dumped it (ELF header,
  program headers, build-id note: what ``eu-unstrip -n --core`` reads);
- every file-backed mapping the kernel dumped whole because the process wrote to
  it (``.data``, the GOT, RELRO), whole: without it gdb would read the file's
  initial values;
- every anonymous mapping of at most ``max_anonymous`` bytes, whole, and the vDSO;
- the pages of each thread's TLS and thread descriptor, and those of the dynamic
  loader's list of libraries (``r_debug``, every ``link_map`` and its name), wherever
  they are.

The program header of a range that is dropped is removed, never kept with
``p_filesz = 0``: gdb reads such a header as zeros (anonymous memory) or as the
file's bytes (file-backed memory), silently wrong, while memory that no header
covers prints as ``<error: Cannot access memory at address …>``.  Headers the
kernel itself wrote without contents (code that gdb reads from the files, guard
pages) stay as the kernel wrote them: the full core has them too.

A note of our own (name :data:`NOTE_NAME`, type :data:`NT_RETRACE_MINIMAL`), in a
note segment after the kernel's, says what was dropped; its JSON is described in
the README (client section).

Standard library only: this runs on the machine that crashed.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from client.errors import ClientError

PAGE = 4096
KIB = 1024
MIB = 1 << 20

DEFAULT_RED_ZONE = 4096
"""Bytes kept below each thread's stack pointer (x86-64's ABI red zone is 128)."""
DEFAULT_MAX_ANONYMOUS = 64 * KIB
"""Anonymous mappings up to this size are kept whole; larger ones are dropped."""

NOTE_NAME = b"RETRACE"
NT_RETRACE_MINIMAL = 0x4E494D52  # "RMIN" as a little-endian word
"""Our note's type: one BFD does not know, so gdb passes over the note (BFD reads an
unknown name's notes by type alone: a small type could pass for NT_PRSTATUS)."""
NOTE_FORMAT = 1

ET_CORE = 4
PT_LOAD, PT_DYNAMIC, PT_NOTE, PT_PHDR, PT_TLS = 1, 2, 4, 6, 7
PF_X, PF_W = 1, 2
PN_XNUM = 0xFFFF
NT_PRSTATUS, NT_AUXV, NT_ARM_TLS, NT_FILE = 1, 6, 0x401, 0x46494C45
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_EXECFN, AT_SYSINFO_EHDR = 0, 3, 4, 5, 31, 33
DT_DEBUG = 21

STACK_GAP = 1 << 20
"""A stack pointer this little below a mapping belongs to it: an overflowed stack,
whose faulting push left the pointer below the lowest stack page."""
THREAD_BYTES = 4096
"""The thread descriptor's side of the thread pointer (glibc's struct pthread: ~2.3 KiB)."""
TLS_SLACK = 4096
"""Static TLS beyond the modules' PT_TLS blocks (glibc's surplus, alignment)."""
PPC_TP_OFFSET = 0x7000
"""On ppc64 the thread pointer points this far past the thread control block."""
LINK_MAP_BYTES = 1152
"""glibc's struct link_map (gdb reads its first five words, libthread_db a few more)."""
MAX_LINK_MAPS = 4096
MAX_NAME = 4096
MAX_STRINGS = 1 << 16
STRINGS_WINDOW = 4 * MIB
"""How much of the main stack's top is searched for the arguments and environment."""
COPY_CHUNK = 1 << 20


class MinimalCoreError(ClientError):
    """The core cannot be minimised; the message says why."""


class Kind(StrEnum):
    """Why a range of memory is kept (the keys of the note's ``kept``)."""

    STACK = "stacks"
    ELF_HEADERS = "elf-headers"
    FILE_DATA = "file-data"
    VDSO = "vdso"
    ANONYMOUS = "anonymous"
    TLS = "tls"
    LOADER = "loader"


# A byte kept for two reasons counts under the first: TLS and the loader's list count
# only what they keep beyond the stacks and the mappings kept whole.
KIND_ORDER = tuple(Kind)
_RANK = {kind: rank for rank, kind in enumerate(KIND_ORDER)}
NOTES = "notes"
KIND_TEXT = {
    NOTES: "notes (registers, auxv, mapped files, signal)",
    Kind.STACK: "thread stacks, from SP minus the red zone",
    Kind.ELF_HEADERS: "first page of file-backed mappings",
    Kind.FILE_DATA: "written file-backed mappings (.data, GOT)",
    Kind.VDSO: "the kernel's vDSO",
    Kind.ANONYMOUS: "small anonymous mappings",
    Kind.TLS: "TLS and thread descriptors (beyond the above)",
    Kind.LOADER: "the loader's list of libraries (beyond the above)",
}


@dataclass(frozen=True)
class Arch:
    """Where a thread's registers sit in NT_PRSTATUS, and which way its TLS lies."""

    regs_at: int  # offset of pr_reg in elf_prstatus
    sp: int  # index of the stack pointer in pr_reg
    tp: int | None  # index of the thread pointer, if pr_reg holds it
    tls_below: bool  # TLS variant II: static TLS below the thread pointer
    tp_offset: int = 0  # how far past the thread control block the thread pointer points


# e_machine -> layout, from the kernel's user_regs_struct of each architecture.  The
# tests run on x86-64; elsewhere a missing thread pointer costs only the TLS pages.
ARCHES = {
    62: Arch(112, 19, 21, tls_below=True),  # x86_64: rsp, fs_base
    183: Arch(112, 31, None, tls_below=False),  # aarch64: sp; tpidr_el0 in NT_ARM_TLS
    21: Arch(112, 1, 13, tls_below=False, tp_offset=PPC_TP_OFFSET),  # ppc64: r1, r13
    243: Arch(112, 2, 4, tls_below=False),  # riscv64: sp, tp
    22: Arch(112, 17, None, tls_below=True),  # s390x: r15
    3: Arch(72, 15, None, tls_below=True),  # i386: esp
}


@dataclass(frozen=True)
class Load:
    """One PT_LOAD: ``filesz`` bytes at ``offset`` in the file, ``memsz`` in memory."""

    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def data_end(self) -> int:
        return self.vaddr + self.filesz

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz


@dataclass(frozen=True)
class Thread:
    """A thread, from its NT_PRSTATUS."""

    pid: int
    sp: int
    tp: int | None


@dataclass(frozen=True)
class Dropped:
    """A range of the core's memory the minimal core leaves out, and why."""

    start: int
    end: int
    why: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Strings:
    """The argument and environment strings at the top of the main stack, each as
    (address, length without its NUL)."""

    arguments: tuple[tuple[int, int], ...] = ()
    environment: tuple[tuple[int, int], ...] = ()
    found: bool = False

    @staticmethod
    def size(strings: tuple[tuple[int, int], ...]) -> int:
        return sum(length + 1 for _, length in strings)


@dataclass(frozen=True)
class Options:
    """How minimal the core is."""

    red_zone: int = DEFAULT_RED_ZONE
    max_anonymous: int = DEFAULT_MAX_ANONYMOUS
    blank_environment: bool = False


@dataclass
class Outcome:
    """What :func:`minimize` kept and dropped."""

    full_size: int
    options: Options
    size: int = 0
    threads: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    strings: Strings = field(default_factory=Strings)

    def note(self) -> dict[str, object]:
        """The JSON of our note (README, client section)."""
        return {
            "format": NOTE_FORMAT,
            "tool": "retrace-client --minimal",
            "full_size": self.full_size,
            "red_zone": self.options.red_zone,
            "max_anonymous": self.options.max_anonymous,
            "environment_blanked": self.options.blank_environment,
            "kept": dict(self.kept),
            "dropped": [
                {"start": f"{d.start:#x}", "end": f"{d.end:#x}", "why": d.why} for d in self.dropped
            ],
        }

    def report(self) -> str:
        """What was kept and why, and what was dropped (``--minimal-report``)."""
        share = 100 * self.size / max(self.full_size, 1)
        lines = [
            f"minimal core: {_size(self.size)} of {_size(self.full_size)} ({share:.2f} %), "
            f"{self.threads} thread(s)",
            "kept:",
        ]
        lines += [f"  {_size(n):>10}  {KIND_TEXT.get(k, k)}" for k, n in self.kept.items()]
        lost = sum(d.size for d in self.dropped)
        lines.append(f"dropped: {len(self.dropped)} range(s), {_size(lost)}")
        lines += [
            f"  {d.start:#014x}-{d.end:#014x} {_size(d.size):>10}  {d.why}" for d in self.dropped
        ]
        lines.append(self._strings_line())
        return "\n".join(lines)

    def _strings_line(self) -> str:
        strings = self.strings
        if not strings.found:
            return (
                "note: the top of the main thread's stack holds the program's arguments and "
                "environment strings, and they are sent (this core's could not be located)"
            )
        arguments = (
            f"{len(strings.arguments)} argument(s) ({_size(strings.size(strings.arguments))})"
        )
        environment = (
            f"{len(strings.environment)} environment string(s) "
            f"({_size(strings.size(strings.environment))})"
        )
        fate = (
            "the environment strings are blanked (zeroed), the arguments are sent"
            if self.options.blank_environment
            else "both are sent; --blank-environment zeroes the environment strings"
        )
        return (
            f"note: the top of the main thread's stack holds the program's {arguments} "
            f"and its {environment}: {fate}"
        )


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= KIB:
        return f"{n / KIB:.1f} KiB"
    return f"{n} B"


def _up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _down(n: int) -> int:
    return n // PAGE * PAGE


class Core:
    """An ELF core's headers and notes, and its memory as its PT_LOADs hold it."""

    def __init__(self, fd: int, name: str = "the core") -> None:
        self.fd = fd
        self.name = name
        self.size = os.fstat(fd).st_size
        self.loads: list[Load] = []
        self.note_segments: list[bytes] = []
        try:
            self._read_headers()
            self.notes = [note for data in self.note_segments for note in self._notes(data)]
        except struct.error as exc:
            raise MinimalCoreError(f"{name} is not a core this client can read") from exc
        if not self.note_segments:
            raise MinimalCoreError(f"{name} has no notes: it is not a core the kernel wrote")
        self.loads.sort(key=lambda load: load.vaddr)  # as the kernel writes them
        self.starts = [load.vaddr for load in self.loads]
        self.minimal_note: dict[str, object] | None = None
        for note_name, kind, desc in self.notes:
            if note_name == NOTE_NAME and kind == NT_RETRACE_MINIMAL:
                try:
                    self.minimal_note = json.loads(desc)
                except ValueError as exc:
                    raise MinimalCoreError(f"{name} has an unreadable minimal-core note") from exc

    def _read_headers(self) -> None:
        ident = os.pread(self.fd, 64, 0)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            raise MinimalCoreError(f"{self.name} is not an ELF file")
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise MinimalCoreError(f"{self.name} has an invalid ELF class or byte order")
        self.ident = ident
        self.wide = ident[4] == 2
        self.order = "<" if ident[5] == 1 else ">"
        self.word = 8 if self.wide else 4
        self.phdr_format = self.order + ("IIQQQQQQ" if self.wide else "IIIIIIII")
        e_type, self.machine = struct.unpack_from(self.order + "HH", ident, 16)
        if e_type != ET_CORE:
            raise MinimalCoreError(f"{self.name} is an ELF file of type {e_type}, not a core")
        arch = ARCHES.get(self.machine)
        if arch is None:
            raise MinimalCoreError(
                f"{self.name} is a core of machine type {self.machine}, which the client "
                "cannot minimise; send it whole (--no-minimal)"
            )
        self.arch = arch
        if self.wide:
            phoff, shoff = struct.unpack_from(self.order + "QQ", ident, 32)
            phentsize, phnum = struct.unpack_from(self.order + "HH", ident, 54)
        else:
            phoff, shoff = struct.unpack_from(self.order + "II", ident, 28)
            phentsize, phnum = struct.unpack_from(self.order + "HH", ident, 42)
        if phnum == PN_XNUM and shoff:  # the real count is section 0's sh_info
            info = os.pread(self.fd, 4, shoff + (44 if self.wide else 28))
            (phnum,) = struct.unpack(self.order + "I", info)
        if phentsize != struct.calcsize(self.phdr_format):
            raise MinimalCoreError(f"{self.name} has program headers of an unknown size")
        table = os.pread(self.fd, phentsize * phnum, phoff)
        if len(table) < phentsize * phnum:
            raise MinimalCoreError(f"{self.name} is cut off inside its program headers")
        for start in range(0, len(table), phentsize):
            self._add_segment(struct.unpack_from(self.phdr_format, table, start))

    def _add_segment(self, values: tuple[int, ...]) -> None:
        if self.wide:
            p_type, flags, offset, vaddr, _, filesz, memsz, align = values
        else:
            p_type, offset, vaddr, _, filesz, memsz, flags, align = values
        if offset + filesz > self.size and p_type in (PT_LOAD, PT_NOTE):
            raise MinimalCoreError(
                f"{self.name} is truncated: it has {self.size} bytes, its headers describe "
                f"{offset + filesz}"
            )
        if p_type == PT_LOAD:
            self.loads.append(Load(flags, offset, vaddr, filesz, memsz, align))
        elif p_type == PT_NOTE:
            self.note_segments.append(os.pread(self.fd, filesz, offset))

    def _notes(self, data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
        at = 0
        while at + 12 <= len(data):
            name_size, desc_size, kind = struct.unpack_from(self.order + "III", data, at)
            at += 12
            name = data[at : at + name_size].rstrip(b"\0")
            at += -(-name_size // 4) * 4
            desc = data[at : at + desc_size]
            at += -(-desc_size // 4) * 4
            if len(desc) < desc_size:
                return
            yield name, kind, desc

    def words(self, data: bytes, count: int | None = None) -> tuple[int, ...]:
        """``count`` (default: all) words of ``data`` in the core's size and byte order."""
        count = len(data) // self.word if count is None else count
        return struct.unpack_from(f"{self.order}{count}{'Q' if self.wide else 'I'}", data)

    def phdr_fields(self, values: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(p_type, p_vaddr, p_memsz, p_align) of a program header's values."""
        if self.wide:
            return values[0], values[3], values[6], values[7]
        return values[0], values[2], values[5], values[7]

    # -- what the notes say -------------------------------------------------

    def note(self, kind: int, names: tuple[bytes, ...] = (b"CORE",)) -> bytes | None:
        """The first note of ``kind`` from one of ``names``."""
        return next((d for n, k, d in self.notes if k == kind and n in names), None)

    def auxv(self) -> dict[int, int]:
        """The auxiliary vector (NT_AUXV)."""
        words = self.words(self.note(NT_AUXV) or b"")
        pairs = dict(zip(words[::2], words[1::2], strict=False))
        pairs.pop(AT_NULL, None)
        return pairs

    def threads(self) -> list[Thread]:
        """Every thread's id, stack pointer and thread pointer (NT_PRSTATUS)."""
        threads: list[Thread] = []
        arch, word = self.arch, self.word
        for name, kind, desc in self.notes:
            if kind == NT_ARM_TLS and name == b"LINUX" and threads and len(desc) >= 8:
                last = threads[-1]  # the notes of a thread follow its NT_PRSTATUS
                threads[-1] = Thread(last.pid, last.sp, self.words(desc, 1)[0] or None)
            if kind != NT_PRSTATUS or name != b"CORE":
                continue
            (pid,) = struct.unpack_from(self.order + "i", desc, 32 if self.wide else 24)
            sp = self.words(desc[arch.regs_at + arch.sp * word :], 1)[0]
            tp = None
            if arch.tp is not None:
                tp = self.words(desc[arch.regs_at + arch.tp * word :], 1)[0] or None
            threads.append(Thread(pid, sp, tp))
        return threads

    def file_mappings(self) -> list[tuple[int, int]]:
        """The file-backed mappings that NT_FILE lists, as (start, end)."""
        desc = self.note(NT_FILE)
        if desc is None:
            return []
        try:
            count = self.words(desc, 1)[0]
            words = self.words(desc[2 * self.word :], 3 * count)
        except struct.error as exc:
            raise MinimalCoreError(f"{self.name} has an unreadable NT_FILE note") from exc
        return [(words[i], words[i + 1]) for i in range(0, len(words), 3)]

    # -- memory -------------------------------------------------------------

    def load_at(self, address: int) -> Load | None:
        """The PT_LOAD whose memory holds ``address``."""
        at = bisect.bisect_right(self.starts, address) - 1
        if at >= 0 and address < self.loads[at].end:
            return self.loads[at]
        return None

    def loads_in(self, start: int, end: int) -> range:
        """The indexes of the PT_LOADs that may overlap [start, end)."""
        return range(
            max(0, bisect.bisect_right(self.starts, start) - 1),
            bisect.bisect_left(self.starts, end),
        )

    def read(self, address: int, size: int) -> bytes | None:
        """``size`` bytes at ``address``; None unless the core holds them all."""
        load = self.load_at(address)
        if load is None or size < 0 or address + size > load.data_end:
            return None
        data = os.pread(self.fd, size, load.offset + address - load.vaddr)
        return data if len(data) == size else None

    def word_at(self, address: int) -> int | None:
        data = self.read(address, self.word)
        return None if data is None else self.words(data, 1)[0]

    def string_length(self, address: int) -> int | None:
        """The length of the NUL-terminated string at ``address``."""
        load = self.load_at(address)
        if load is None or address >= load.data_end:
            return None
        data = self.read(address, min(MAX_NAME, load.data_end - address)) or b""
        end = data.find(b"\0")
        return None if end < 0 else end

    def module_headers(self) -> Iterator[list[tuple[int, int, int, int]]]:
        """The program headers of each module whose ELF header the core holds, as
        (p_type, p_vaddr, p_memsz, p_align)."""
        size = struct.calcsize(self.phdr_format)
        for load in self.loads:
            if load.filesz < 64:
                continue
            head = os.pread(self.fd, min(load.filesz, PAGE), load.offset)
            if head[:4] != b"\x7fELF" or head[4:6] != self.ident[4:6]:
                continue
            if self.wide:
                (phoff,) = struct.unpack_from(self.order + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(self.order + "HH", head, 54)
            else:
                (phoff,) = struct.unpack_from(self.order + "I", head, 28)
                phentsize, phnum = struct.unpack_from(self.order + "HH", head, 42)
            if phentsize != size or phoff + size * phnum > len(head):
                continue
            yield [
                self.phdr_fields(struct.unpack_from(self.phdr_format, head, phoff + i * size))
                for i in range(phnum)
            ]

    def static_tls_size(self) -> int:
        """What the modules' PT_TLS blocks add up to, plus slack."""
        total = TLS_SLACK
        for headers in self.module_headers():
            for p_type, _, memsz, align in headers:
                if p_type == PT_TLS:
                    total += -(-memsz // max(align, 1)) * max(align, 1)
        return total

    def loader_ranges(self) -> list[tuple[int, int]]:
        """The loader's list of libraries, as gdb reads it to find a core's shared
        libraries: ``r_debug`` (found through the program's ``DT_DEBUG``), and each
        ``link_map`` of each namespace with its name."""
        r_debug = self._r_debug()
        ranges: list[tuple[int, int]] = []
        seen: set[int] = set()
        word = self.word
        while r_debug and r_debug not in seen and len(seen) < MAX_LINK_MAPS:
            seen.add(r_debug)
            ranges.append((r_debug, r_debug + 6 * word))
            link_map = self.word_at(r_debug + word)
            while link_map and link_map not in seen and len(seen) < MAX_LINK_MAPS:
                seen.add(link_map)
                ranges.append((link_map, link_map + LINK_MAP_BYTES))
                name = self.word_at(link_map + word)
                length = self.string_length(name) if name else None
                if name and length is not None:
                    ranges.append((name, name + length + 1))
                link_map = self.word_at(link_map + 3 * word)
            version = self.read(r_debug, 4)
            if version is None or struct.unpack(self.order + "i", version)[0] < 2:
                break
            r_debug = self.word_at(r_debug + 5 * word) or 0  # r_debug_extended.r_next
        return ranges

    def _r_debug(self) -> int:
        auxv = self.auxv()
        phdr, phnum = auxv.get(AT_PHDR), auxv.get(AT_PHNUM)
        size = struct.calcsize(self.phdr_format)
        if not phdr or not phnum or auxv.get(AT_PHENT, size) != size:
            return 0
        table = self.read(phdr, phnum * size)
        if table is None:
            return 0
        headers = [
            self.phdr_fields(struct.unpack_from(self.phdr_format, table, i * size))
            for i in range(phnum)
        ]
        bias = next((phdr - vaddr for kind, vaddr, _, _ in headers if kind == PT_PHDR), None)
        dynamic = next(((v, n) for kind, v, n, _ in headers if kind == PT_DYNAMIC), None)
        if bias is None or dynamic is None:
            return 0
        words = self.words(self.read(dynamic[0] + bias, dynamic[1]) or b"")
        pairs = zip(words[::2], words[1::2], strict=False)
        return next((value for tag, value in pairs if tag == DT_DEBUG), 0)

    def strings(self) -> Strings:
        """The argument and environment strings at the top of the main stack.

        The kernel starts a program's stack with ``argc``, ``argv[]``, NULL, ``envp[]``,
        NULL and the auxiliary vector (the very bytes of NT_AUXV); the strings these
        point to lie above, up to AT_EXECFN's name at the top.
        """
        execfn = self.auxv().get(AT_EXECFN)
        auxv = self.note(NT_AUXV) or b""
        load = self.load_at(execfn) if execfn else None
        if load is None or not auxv:
            return Strings()
        base = max(load.vaddr, load.data_end - STRINGS_WINDOW)
        top = self.read(base, load.data_end - base) or b""
        at = top.rfind(auxv)
        if at <= 0 or at % self.word:
            return Strings()
        words = self.words(top[:at])
        index = len(words) - 1
        if index < 0 or words[index] != 0:  # the NULL that ends envp[]
            return Strings()
        index -= 1
        environment: list[int] = []
        while index >= 0 and words[index] and len(environment) < MAX_STRINGS:
            environment.append(words[index])
            index -= 1
        index -= 1  # past the NULL that ends argv[], down to argc
        arguments: list[int] = []
        while index >= 0 and words[index] != len(arguments) and len(arguments) < MAX_STRINGS:
            arguments.append(words[index])
            index -= 1
        if index < 0:
            return Strings()

        def measured(pointers: list[int]) -> tuple[tuple[int, int], ...] | None:
            out = []
            for pointer in reversed(pointers):
                offset = pointer - base
                end = top.find(b"\0", offset) if 0 <= offset < len(top) else -1
                if end < 0:
                    return None
                out.append((pointer, end - offset))
            return tuple(out)

        found_arguments, found_environment = measured(arguments), measured(environment)
        if found_arguments is None or found_environment is None:
            return Strings()
        return Strings(found_arguments, found_environment, found=True)


# -- what to keep -----------------------------------------------------------


def _layer(pieces: list[tuple[int, int, Kind]]) -> list[tuple[int, int, Kind]]:
    """Disjoint ranges covering ``pieces``, each with the first kind that covers it."""
    points = sorted({p for start, end, _ in pieces for p in (start, end)})
    out: list[tuple[int, int, Kind]] = []
    for low, high in itertools.pairwise(points):
        covering = [kind for start, end, kind in pieces if start <= low and high <= end]
        if not covering:
            continue
        kind = min(covering, key=_RANK.__getitem__)
        if out and out[-1][1] == low and out[-1][2] == kind:
            out[-1] = (out[-1][0], high, kind)
        else:
            out.append((low, high, kind))
    return out


@dataclass
class _Plan:
    """Per PT_LOAD (by index): the kept ranges, disjoint and in order, with their kind."""

    kept: dict[int, list[tuple[int, int, Kind]]]
    dropped: list[Dropped]
    blank: list[tuple[int, int]]  # (address, length) of bytes to zero


class _Planner:
    """Decides which ranges of which PT_LOAD the minimal core keeps, and why."""

    def __init__(self, core: Core, options: Options) -> None:
        self.core = core
        self.options = options
        self.files = sorted(core.file_mappings())
        self._file_starts = [start for start, _ in self.files]
        self.pieces: dict[int, list[tuple[int, int, Kind]]] = {
            i: [] for i in range(len(core.loads))
        }
        self.stack_of: dict[int, list[int]] = {}  # PT_LOAD index -> thread ids
        self.threads = core.threads()

    def file_backed(self, load: Load) -> bool:
        """Whether NT_FILE names a file mapped in ``load``'s range."""
        # The mappings do not overlap: the last one starting below the load's end
        # reaches furthest.
        at = bisect.bisect_left(self._file_starts, load.end) - 1
        return at >= 0 and self.files[at][1] > load.vaddr

    def by_mapping(self) -> None:
        """What each mapping's kind keeps of it."""
        vdso = self.core.auxv().get(AT_SYSINFO_EHDR)
        for i, load in enumerate(self.core.loads):
            if not load.filesz:
                continue
            if self.file_backed(load):
                whole = (load.vaddr, load.data_end, Kind.FILE_DATA)
                if load.flags & PF_W:
                    self.pieces[i].append(whole)
                    continue
                first = (load.vaddr, min(load.data_end, load.vaddr + PAGE), Kind.ELF_HEADERS)
                self.pieces[i].append(first)
                header_only = load.filesz < load.memsz  # the kernel dumped its ELF header
                code = load.flags & PF_X  # gdb reads it from the file
                if not header_only and not code:  # dumped whole: written to, as RELRO is
                    self.pieces[i].append(whole)
            elif vdso is not None and load.vaddr <= vdso < load.end:
                self.pieces[i].append((load.vaddr, load.data_end, Kind.VDSO))
            elif load.memsz <= self.options.max_anonymous:
                self.pieces[i].append((load.vaddr, load.data_end, Kind.ANONYMOUS))

    def add(self, start: int, end: int, kind: Kind) -> None:
        """Keep the pages of [start, end) wherever the core holds them."""
        start, end = _down(start), _up(end)
        for i in self.core.loads_in(start, end):
            load = self.core.loads[i]
            low, high = max(start, load.vaddr), min(end, load.data_end)
            if low < high:
                self.pieces[i].append((low, high, kind))

    def stacks(self, threads: list[Thread]) -> None:
        """Each thread's stack, from its pointer minus the red zone to its mapping's end."""
        loads = self.core.loads
        for thread in threads:
            # The PT_LOAD holding the pointer, else the first above it, if close enough.
            i = bisect.bisect_right(self.core.starts, thread.sp) - 1
            if i < 0 or thread.sp >= loads[i].end:
                i += 1
                if i == len(loads) or loads[i].vaddr > thread.sp + STACK_GAP:
                    continue
            load = loads[i]
            if not load.filesz:
                continue
            start = max(load.vaddr, _down(thread.sp - self.options.red_zone))
            self.pieces[i].append((min(start, load.data_end), load.data_end, Kind.STACK))
            self.stack_of.setdefault(i, []).append(thread.pid)

    def thread_areas(self, threads: list[Thread]) -> None:
        """Each thread's static TLS and thread descriptor, on their side of its pointer."""
        arch = self.core.arch
        tls = self.core.static_tls_size()
        for thread in threads:
            if thread.tp is None:
                continue
            block = thread.tp - arch.tp_offset
            if arch.tls_below:
                self.add(block - tls, block + THREAD_BYTES, Kind.TLS)
            else:
                self.add(block - THREAD_BYTES, block + tls, Kind.TLS)

    def plan(self) -> _Plan:
        self.by_mapping()
        self.stacks(self.threads)
        self.thread_areas(self.threads)
        for start, end in self.core.loader_ranges():
            self.add(start, end, Kind.LOADER)
        kept: dict[int, list[tuple[int, int, Kind]]] = {}
        dropped: list[Dropped] = []
        for i, load in enumerate(self.core.loads):
            if not load.filesz:
                continue
            kept[i] = _layer(self.pieces[i])
            cursor = load.vaddr
            for start, end, _ in [*kept[i], (load.data_end, load.data_end, Kind.STACK)]:
                if cursor < start:
                    dropped.append(Dropped(cursor, start, self.why(i, load)))
                cursor = max(cursor, end)
        return _Plan(kept, dropped, [])

    def why(self, index: int, load: Load) -> str:
        size = _size(load.memsz)
        pids = self.stack_of.get(index)
        if pids:
            return (
                f"stack of thread {', '.join(map(str, pids))} below its pointer minus "
                f"the {self.options.red_zone}-byte red zone"
            )
        if self.file_backed(load):
            return f"file-backed code mapping of {size} past its first page (read from the file)"
        return f"anonymous mapping of {size}, over the {_size(self.options.max_anonymous)} bound"


# -- writing ----------------------------------------------------------------


def _note(payload: bytes, order: str) -> bytes:
    name = NOTE_NAME + b"\0"
    head = struct.pack(order + "III", len(name), len(payload), NT_RETRACE_MINIMAL)
    return head + _padded(name) + _padded(payload)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _pieces(core: Core, plan: _Plan, outcome: Outcome) -> list[tuple[Load, int]]:
    """The new PT_LOADs, each with the offset in the old core its bytes come from.

    A kept piece that reaches its PT_LOAD's data end keeps the no-contents tail the
    kernel gave that PT_LOAD (an ELF-header page of a larger mapping).
    """
    kept = dict.fromkeys(KIND_ORDER, 0)
    loads: list[tuple[Load, int]] = []
    for i, load in enumerate(core.loads):
        if not load.filesz:
            loads.append((load, 0))
            continue
        merged: list[list[int]] = []
        for start, end, kind in plan.kept[i]:
            kept[kind] += end - start
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        for start, end in merged:
            memsz = (load.end if end == load.data_end else end) - start
            piece = Load(load.flags, 0, start, end - start, memsz, load.align)
            loads.append((piece, load.offset + start - load.vaddr))
    notes = sum(len(segment) for segment in core.note_segments)
    outcome.kept = {NOTES: notes} | {str(k): n for k, n in kept.items() if n}
    return loads


class _Writer:
    """Lays out and writes the minimal core: ELF header, program headers, the
    kernel's notes, ours, then each kept piece at a page-aligned offset."""

    def __init__(self, core: Core, pieces: list[tuple[Load, int]], note: bytes) -> None:
        self.core = core
        self.note = note
        self.ehdr_size = 64 if core.wide else 52
        self.phdr_size = struct.calcsize(core.phdr_format)
        self.count = len(core.note_segments) + 1 + len(pieces)
        at = self.ehdr_size + self.phdr_size * self.count
        self.notes_at: list[int] = []
        for segment in [*core.note_segments, note]:
            self.notes_at.append(at)
            at += len(segment)
        self.placed: list[tuple[Load, int, int]] = []  # (header, offset here, offset there)
        for load, source in pieces:
            if load.filesz:
                at = _up(at)
            self.placed.append((load, at, source))
            at += load.filesz
        self.shoff = 0
        if self.count >= PN_XNUM:  # the real count goes in section 0's sh_info
            self.shoff = at
            at += 64 if core.wide else 40
        self.size = at

    def headers(self) -> bytes:
        core, order = self.core, self.core.order
        header = bytearray(core.ident[: self.ehdr_size])
        phnum = PN_XNUM if self.shoff else self.count
        shentsize, shnum = (64 if core.wide else 40, 1) if self.shoff else (0, 0)
        sizes = (self.ehdr_size, self.phdr_size, phnum, shentsize, shnum, 0)
        if core.wide:
            struct.pack_into(order + "QQQ", header, 24, 0, self.ehdr_size, self.shoff)
            struct.pack_into(order + "HHHHHH", header, 52, *sizes)
        else:
            struct.pack_into(order + "III", header, 24, 0, self.ehdr_size, self.shoff)
            struct.pack_into(order + "HHHHHH", header, 40, *sizes)
        table = bytearray()
        for segment, at in zip([*core.note_segments, self.note], self.notes_at, strict=True):
            table += self._phdr(PT_NOTE, 0, at, 0, len(segment), 0, 4)
        for load, at, _ in self.placed:
            table += self._phdr(
                PT_LOAD, load.flags, at, load.vaddr, load.filesz, load.memsz, load.align
            )
        return bytes(header + table)

    def _phdr(
        self, p_type: int, flags: int, offset: int, vaddr: int, filesz: int, memsz: int, align: int
    ) -> bytes:
        if self.core.wide:
            values = (p_type, flags, offset, vaddr, 0, filesz, memsz, align)
        else:
            values = (p_type, offset, vaddr, 0, filesz, memsz, flags, align)
        return struct.pack(self.core.phdr_format, *values)

    def write(
        self,
        dest: Path,
        blank: list[tuple[int, int]],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        total = sum(load.filesz for load, _, _ in self.placed)
        done = 0
        with dest.open("wb") as out:
            out.write(self.headers())
            for segment in self.core.note_segments:
                out.write(segment)
            out.write(self.note)
            for load, at, source in self.placed:
                out.seek(at)
                for copied in range(0, load.filesz, COPY_CHUNK):
                    size = min(COPY_CHUNK, load.filesz - copied)
                    data = os.pread(self.core.fd, size, source + copied)
                    if len(data) != size:
                        raise MinimalCoreError(f"{self.core.name} changed while it was read")
                    out.write(_blanked(data, load.vaddr + copied, blank) if blank else data)
                    done += size
                    if progress:
                        progress(done, total)
            if self.shoff:
                section = bytearray(64 if self.core.wide else 40)
                struct.pack_into(
                    self.core.order + "I", section, 44 if self.core.wide else 28, self.count
                )
                out.seek(self.shoff)
                out.write(section)
            out.truncate(self.size)


def _blanked(data: bytes, address: int, blank: list[tuple[int, int]]) -> bytes:
    end = address + len(data)
    out: bytearray | None = None
    for start, length in blank:
        low, high = max(start, address), min(start + length, end)
        if low < high:
            out = out if out is not None else bytearray(data)
            out[low - address : high - address] = bytes(high - low)
    return data if out is None else bytes(out)


def minimize(
    source: Path,
    dest: Path,
    options: Options | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Outcome:
    """Write the minimal core of ``source`` to ``dest``; say what was kept and dropped."""
    options = options or Options()
    if options.red_zone < 0 or options.max_anonymous < 0:
        raise MinimalCoreError("the red zone and the anonymous bound cannot be negative")
    if dest.exists() and source.exists() and dest.samefile(source):
        raise MinimalCoreError(f"{dest} is the core itself: write the minimal core elsewhere")
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        raise MinimalCoreError(f"cannot read {source}: {exc.strerror}") from exc
    try:
        core = Core(fd, str(source))
        if core.minimal_note is not None:
            raise MinimalCoreError(f"{source} is a minimal core already")
        outcome = Outcome(full_size=core.size, options=options)
        planner = _Planner(core, options)
        plan = planner.plan()
        outcome.threads = len(planner.threads)
        outcome.dropped = plan.dropped
        outcome.strings = core.strings()
        if options.blank_environment:
            if not outcome.strings.found:
                raise MinimalCoreError(
                    f"the environment strings of {source} cannot be found, so they cannot be "
                    "blanked; send without --blank-environment, or not at all"
                )
            plan.blank = list(outcome.strings.environment)
        pieces = _pieces(core, plan, outcome)
        note = _note(json.dumps(outcome.note(), separators=(",", ":")).encode(), core.order)
        writer = _Writer(core, pieces, note)
        outcome.size = writer.size
        writer.write(dest, plan.blank, progress)
    finally:
        os.close(fd)
    return outcome


def read_note(core: Path) -> dict[str, object] | None:
    """The JSON of a minimal core's note (README, client section); None for a core
    without one."""
    fd = os.open(core, os.O_RDONLY)
    try:
        return Core(fd, str(core)).minimal_note
    finally:
        os.close(fd)
