"""Minimal cores (client/minicore.py) on a synthetic x86-64 core built here, byte by byte.

The real cores the kernel writes, retraced by gdb, are tests/integration/test_minimal_cores.py's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client import minicore
from client.minicore import MinimalCoreError, Options, minimize, read_note
from services.analyzer.coredump import CoreError, minimal_note
from services.common.elf import core_arch, open_elf

PAGE = 4096
PHDR = "<IIQQQQQQ"
NT_PRSTATUS, NT_PRPSINFO, NT_AUXV, NT_FILE = 1, 3, 6, 0x46494C45

EXE = 0x400000
EXE_DATA = 0x403000
R_DEBUG = EXE_DATA + 0x100
HEAP = 0x600000
HEAP_SIZE = 0x40000
LINK_MAP = HEAP + 0x20000
LIB_NAME = b"/usr/lib64/libfoo.so.1"
SMALL = 0x700000
GUARD = 0x7F0000000000
TLS_AREA = 0x7F0000100000
FS_BASE = TLS_AREA + 0x80000
VDSO = 0x7FFF00000000
STACK = 0x7FFE00000000
STACK_SIZE = 0x21000
SP = STACK + 0x10000
ARGV0 = b"/usr/bin/prog"
ENVIRONMENT = (b"SECRET_TOKEN=hunter2", b"LANG=C")
EXECFN = STACK + STACK_SIZE - 8 - len(ARGV0) - 1


@dataclass
class Segment:
    vaddr: int
    memsz: int
    flags: int
    data: bytearray = field(default_factory=bytearray)

    def put(self, address: int, data: bytes) -> None:
        at = address - self.vaddr
        self.data[at : at + len(data)] = data


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    return struct.pack("<III", len(name), len(desc), kind) + padded(name) + padded(desc)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def prstatus(pid: int, sp: int, fs_base: int) -> bytes:
    desc = bytearray(336)
    struct.pack_into("<i", desc, 32, pid)
    struct.pack_into("<Q", desc, 112 + 19 * 8, sp)
    struct.pack_into("<Q", desc, 112 + 21 * 8, fs_base)
    return bytes(desc)


def exe_header() -> bytes:
    """An ELF program's first page: header and program headers (PHDR, DYNAMIC, TLS)."""
    head = bytearray(PAGE)
    head[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", head, 16, 3, 62, 1, 0x1040, 64, 0, 0, 64, 56, 3, 64, 0, 0)
    phdrs = (
        (6, 4, 64, 0x40, 0x40, 3 * 56, 3 * 56, 8),  # PT_PHDR
        (2, 6, 0x3000, 0x3000, 0x3000, 32, 32, 8),  # PT_DYNAMIC
        (7, 4, 0x2000, 0x2000, 0x2000, 0x100, 0x100, 16),  # PT_TLS
    )
    for i, values in enumerate(phdrs):
        struct.pack_into(PHDR, head, 64 + i * 56, *values)
    return bytes(head)


def build_core(path: Path) -> None:
    """A core as the kernel writes one, of a program with a heap, a small anonymous
    mapping, a thread area, a vDSO and a stack."""
    exe_head = Segment(EXE, 0x3000, 4, bytearray(exe_header()))
    exe_data = Segment(EXE_DATA, PAGE, 6, bytearray(PAGE))
    exe_data.put(EXE_DATA, struct.pack("<QQQQ", 21, R_DEBUG, 0, 0))  # DT_DEBUG, DT_NULL
    exe_data.put(R_DEBUG, struct.pack("<iiQ", 1, 0, LINK_MAP))
    heap = Segment(HEAP, HEAP_SIZE, 6, bytearray(HEAP_SIZE))
    heap.put(HEAP + 0x10, b"SECRET-IN-THE-HEAP")
    heap.put(LINK_MAP, struct.pack("<QQQQQ", 0, LINK_MAP + 0x100, 0, 0, 0))
    heap.put(LINK_MAP + 0x100, LIB_NAME + b"\0")
    small = Segment(SMALL, 2 * PAGE, 6, bytearray(2 * PAGE))
    small.put(SMALL + 8, b"SMALL-ANONYMOUS")
    guard = Segment(GUARD, PAGE, 0)
    tls = Segment(TLS_AREA, 0x100000, 6, bytearray(0x100000))
    tls.put(FS_BASE, struct.pack("<Q", FS_BASE) + b"THREAD-DESCRIPTOR")
    tls.put(FS_BASE - 0x40, b"STATIC-TLS")
    tls.put(TLS_AREA + 0x10, b"SECRET-FAR-FROM-TLS")
    vdso = Segment(VDSO, 2 * PAGE, 5, bytearray(b"\x7fELF" + bytes(2 * PAGE - 4)))
    stack = Segment(STACK, STACK_SIZE, 6, bytearray(STACK_SIZE))
    stack.put(SP - 0x8000, b"SECRET-BELOW-THE-RED-ZONE")
    stack.put(SP - 64, b"IN-THE-RED-ZONE")
    stack.put(SP + 16, b"A-LOCAL-ON-THE-STACK")
    # The top of the main stack, as the kernel lays it out.
    top = STACK + STACK_SIZE
    stack.put(EXECFN, ARGV0 + b"\0")
    strings, at = [], STACK + STACK_SIZE - 0x200
    for text in (ARGV0, *ENVIRONMENT):
        stack.put(at, text + b"\0")
        strings.append(at)
        at += len(text) + 1
    # AT_PHDR, AT_PHENT, AT_PHNUM, AT_EXECFN, AT_SYSINFO_EHDR, AT_NULL
    auxv = struct.pack("<12Q", 3, EXE + 0x40, 4, 56, 5, 3, 31, EXECFN, 33, VDSO, 0, 0)
    block = struct.pack("<6Q", 1, strings[0], 0, strings[1], strings[2], 0) + auxv
    stack.put(top - 0x400, block)
    mapped = [(EXE, EXE + 0x3000, 0), (EXE_DATA, EXE_DATA + PAGE, 3)]
    names = b"/usr/bin/prog\0" * len(mapped)
    file_note = struct.pack("<QQ", len(mapped), PAGE)
    file_note += b"".join(struct.pack("<QQQ", *m) for m in mapped) + names
    notes = (
        note(b"CORE", NT_PRSTATUS, prstatus(4242, SP, FS_BASE))
        + note(b"CORE", NT_PRPSINFO, bytes(136))
        + note(b"CORE", NT_AUXV, auxv)
        + note(b"CORE", NT_FILE, file_note)
    )
    # The kernel dumps only the ELF header page of the program's first mapping.
    segments = [exe_head, exe_data, heap, small, guard, tls, vdso, stack]
    filesz = {id(exe_head): PAGE, id(guard): 0}
    count = 1 + len(segments)
    at = 64 + 56 * count
    header = bytearray(64)
    header[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, count, 0, 0, 0)
    table = struct.pack(PHDR, 4, 0, at, 0, 0, len(notes), 0, 4)
    body = bytearray(notes)
    offset = -(-(at + len(notes)) // PAGE) * PAGE
    placed = []
    for segment in segments:
        size = filesz.get(id(segment), segment.memsz)
        table += struct.pack(
            PHDR, 1, segment.flags, offset, segment.vaddr, 0, size, segment.memsz, PAGE
        )
        placed.append((offset, bytes(segment.data[:size])))
        offset += size
    with path.open("wb") as out:
        out.write(bytes(header) + table + body)
        for where, data in placed:
            out.seek(where)
            out.write(data)
        out.truncate(offset)


@pytest.fixture
def core(tmp_path: Path) -> Path:
    path = tmp_path / "core"
    build_core(path)
    return path


def loads(path: Path) -> list[tuple[int, int, int, int, int]]:
    """(flags, offset, vaddr, filesz, memsz) of each PT_LOAD."""
    data = path.read_bytes()
    (phoff,) = struct.unpack_from("<Q", data, 32)
    (phnum,) = struct.unpack_from("<H", data, 56)
    out = []
    for i in range(phnum):
        kind, flags, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from(
            PHDR, data, phoff + 56 * i
        )
        if kind == 1:
            out.append((flags, offset, vaddr, filesz, memsz))
    return out


def memory(path: Path, address: int, size: int) -> bytes | None:
    """What a debugger reads at ``address``: None where no PT_LOAD with contents is."""
    data = path.read_bytes()
    for _, offset, vaddr, filesz, _ in loads(path):
        if vaddr <= address and address + size <= vaddr + filesz:
            return data[offset + address - vaddr : offset + address - vaddr + size]
    return None


def covered(path: Path, address: int) -> bool:
    return any(vaddr <= address < vaddr + memsz for _, _, vaddr, _, memsz in loads(path))


def test_what_a_retrace_needs_is_kept_and_the_rest_has_no_program_header(
    core: Path, tmp_path: Path
) -> None:
    out = tmp_path / "minimal"
    outcome = minimize(core, out)
    # The intake's and the analyzer's checks: an x86-64 ELF core, complete.
    assert core_arch(out) == "x86_64"
    assert open_elf(out).described_size() == out.stat().st_size == outcome.size
    assert outcome.size < core.stat().st_size // 3
    assert memory(out, SP + 16, 20) == b"A-LOCAL-ON-THE-STACK"
    assert memory(out, SP - 64, 15) == b"IN-THE-RED-ZONE"
    assert memory(out, SMALL + 8, 15) == b"SMALL-ANONYMOUS"
    assert memory(out, EXE, 4) == b"\x7fELF"
    assert memory(out, R_DEBUG + 8, 8) == struct.pack("<Q", LINK_MAP)
    assert memory(out, LINK_MAP + 0x100, len(LIB_NAME)) == LIB_NAME
    assert memory(out, FS_BASE + 8, 17) == b"THREAD-DESCRIPTOR"
    assert memory(out, FS_BASE - 0x40, 10) == b"STATIC-TLS"
    assert memory(out, VDSO, 4) == b"\x7fELF"
    assert memory(out, STACK + STACK_SIZE - 0x200, len(ARGV0)) == ARGV0
    # Dropped memory has no program header at all: gdb says "Cannot access memory".
    for address in (HEAP + 0x10, SP - 0x8000, TLS_AREA + 0x10):
        assert not covered(out, address), hex(address)
    data = out.read_bytes()
    for secret in (b"SECRET-IN-THE-HEAP", b"SECRET-BELOW-THE-RED-ZONE", b"SECRET-FAR-FROM-TLS"):
        assert secret not in data
    # Only the kernel's own headers without contents are left: the guard page, and the
    # ELF-header page's tail (read from the file), as in the full core.
    empty = [(vaddr, memsz) for _, _, vaddr, filesz, memsz in loads(out) if not filesz]
    assert empty == [(GUARD, PAGE)]
    assert (4, EXE, PAGE, 0x3000) in {(f, v, fs, m) for f, _, v, fs, m in loads(out)}


def test_the_note_lists_what_was_dropped_and_the_analyzer_reads_it(
    core: Path, tmp_path: Path
) -> None:
    out = tmp_path / "minimal"
    outcome = minimize(core, out, Options(red_zone=8192, max_anonymous=16 * 1024))
    note = read_note(out)
    assert note is not None
    assert note["format"] == 1
    assert note["full_size"] == core.stat().st_size
    assert (note["red_zone"], note["max_anonymous"]) == (8192, 16384)
    assert note["environment_blanked"] is False
    entries = note["dropped"]
    assert isinstance(entries, list)
    dropped = {(int(d["start"], 16), int(d["end"], 16)): d["why"] for d in entries}
    assert dropped[(HEAP, LINK_MAP)].startswith("anonymous mapping of 256.0 KiB, over the 16.0")
    assert dropped[(STACK, SP - 8192)] == (
        "stack of thread 4242 below its pointer minus the 8192-byte red zone"
    )
    kept = note["kept"]
    assert isinstance(kept, dict)
    assert set(kept) == {
        "notes",
        "stacks",
        "tls",
        "loader",
        "elf-headers",
        "file-data",
        "vdso",
        "anonymous",
    }
    assert kept == outcome.kept
    # The analyzer's reader (services/analyzer/coredump.py) agrees.
    read = minimal_note(out)
    assert read is not None
    assert [(d.start, d.end) for d in read.dropped] == [(d.start, d.end) for d in outcome.dropped]
    assert minimal_note(core) is None
    # A minimal core is not minimised again.
    with pytest.raises(MinimalCoreError, match="a minimal core already"):
        minimize(out, tmp_path / "again")


def test_the_analyzer_refuses_a_note_it_cannot_read(core: Path, tmp_path: Path) -> None:
    out = tmp_path / "minimal"
    minimize(core, out)
    data = out.read_bytes()
    assert b'"dropped":[' in data
    out.write_bytes(data.replace(b'"dropped":[', b'"dropped":{', 1))
    with pytest.raises(CoreError, match="minimal-core note does not read"):
        minimal_note(out)


def test_the_red_zone_and_the_anonymous_bound_are_settable(core: Path, tmp_path: Path) -> None:
    out = tmp_path / "minimal"
    minimize(core, out, Options(red_zone=0x9000, max_anonymous=HEAP_SIZE))
    assert memory(out, SP - 0x8000, 25) == b"SECRET-BELOW-THE-RED-ZONE"
    assert memory(out, HEAP + 0x10, 18) == b"SECRET-IN-THE-HEAP"
    minimize(core, out, Options(red_zone=0, max_anonymous=0))
    assert not covered(out, SP - 64)
    assert not covered(out, SMALL)
    assert memory(out, SP, 16) is not None  # the stack from its pointer up, whatever the bound
    assert memory(out, VDSO, 4) == b"\x7fELF"


def test_the_environment_can_be_blanked_and_the_report_says_what_is_sent(
    core: Path, tmp_path: Path
) -> None:
    out = tmp_path / "minimal"
    outcome = minimize(core, out)
    assert outcome.strings.found
    assert [length for _, length in outcome.strings.environment] == [len(e) for e in ENVIRONMENT]
    report = outcome.report()
    assert "top of the main thread's stack holds the program's 1 argument(s)" in report
    assert "2 environment string(s) (28 B): both are sent" in report
    assert b"SECRET_TOKEN=hunter2" in out.read_bytes()
    blanked = minimize(core, out, Options(blank_environment=True))
    data = out.read_bytes()
    assert b"SECRET_TOKEN" not in data
    assert b"LANG=C" not in data
    assert ARGV0 in data
    assert "the environment strings are blanked (zeroed)" in blanked.report()
    assert json.loads(json.dumps(read_note(out)))["environment_blanked"] is True


def test_the_report_gives_bytes_per_kind_and_every_dropped_range(
    core: Path, tmp_path: Path
) -> None:
    report = minimize(core, tmp_path / "minimal").report()
    lines = report.splitlines()
    assert lines[0].startswith("minimal core: ")
    assert "1 thread(s)" in lines[0]
    for text in minicore.KIND_TEXT.values():
        assert any(line.endswith(text) for line in lines), text
    assert "dropped: 5 range(s)" in report
    assert f"{HEAP:#014x}-{LINK_MAP:#014x}" in report


def test_what_is_not_a_kernel_core_is_refused(core: Path, tmp_path: Path) -> None:
    not_elf = tmp_path / "text"
    not_elf.write_text("hello")
    with pytest.raises(MinimalCoreError, match="not an ELF file"):
        minimize(not_elf, tmp_path / "out")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(core.read_bytes()[: 5 * PAGE])
    with pytest.raises(MinimalCoreError, match="is truncated"):
        minimize(truncated, tmp_path / "out")
    other = tmp_path / "other"
    data = bytearray(core.read_bytes())
    data[18:20] = (8).to_bytes(2, "little")  # EM_MIPS
    other.write_bytes(bytes(data))
    with pytest.raises(MinimalCoreError, match="cannot minimise; send it whole"):
        minimize(other, tmp_path / "out")
    with pytest.raises(MinimalCoreError, match="is the core itself"):
        minimize(core, core)
    assert core.stat().st_size > 5 * PAGE


def test_an_environment_that_cannot_be_found_is_not_claimed_blanked(
    core: Path, tmp_path: Path
) -> None:
    data = bytearray(core.read_bytes())
    # Another auxv on the stack than the note's: the strings cannot be located.
    top = data.rfind(struct.pack("<QQ", 31, EXECFN))
    data[top] = 30
    core.write_bytes(bytes(data))
    outcome = minimize(core, tmp_path / "out")
    assert not outcome.strings.found
    assert "could not be located" in outcome.report()
    with pytest.raises(MinimalCoreError, match="cannot be blanked"):
        minimize(core, tmp_path / "out", Options(blank_environment=True))
