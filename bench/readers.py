"""Reader benchmarks: would libarchive or pyelftools do better than our own readers?

Run ``bench/readers`` from the project root (a minute or two; the first run also builds
the large RPM, a few minutes, kept under ``.cache/bench/``).  Prints the medians of
``--runs`` runs, the contenders taken in turns so that each sees the machine alike:

payload  every regular member's data of each fixture RPM, and of one large RPM (about
         200 MiB of this machine's shared libraries, zstd level 19 payload), read with
         ``services.common.rpmfile.RpmReader`` and with libarchive through libarchive-c
         (its entries used only inside the reader's ``with`` block), at 64 KiB and 1 MiB
         blocks; then what a libarchive-based reader would do to replace RpmReader, which
         also reads the header's tags (libarchive does not expose them) and hashes the
         whole file: our header reader, sha256 and libarchive at 64 KiB blocks.
elf      the build-id and kind (program or library, debug file, ``.dwz``) of every ELF
         file in the fixture RPMs' payloads, and in the large RPM's, held in memory
         beforehand, with ``services.common.elf.scan`` (which reads each file as a
         stream) and with pyelftools (``ELFFile`` over a ``BytesIO`` of the whole file,
         its note sections).  Both must find the same.

A ratio is the other library's time over ours: above 1, ours is faster.  libarchive-c
and pyelftools are in the ``dev`` extra; without one, its columns are skipped, saying so.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from services.common.elf import DWZ_DIR, ElfKind, Scanned, scan  # noqa: E402
from services.common.rpmfile import CHUNK, RpmReader, read_header  # noqa: E402
from tests.fixtures.build import build_fixtures  # noqa: E402

MIB = 1 << 20
CACHE = PROJECT / ".cache" / "bench"
LIBRARIES = Path("/usr/lib/x86_64-linux-gnu")
BIG_SPEC = """\
Name: benchbig
Version: 1.0
Release: 1
Summary: Compiled data for bench/readers
License: Various
AutoReqProv: no
%global debug_package %{{nil}}
%global __spec_install_post %{{nil}}
%global __os_install_post %{{nil}}
%global _build_id_links none
%description
This machine's shared libraries, about {mib} MiB of them.
%install
mkdir -p %{{buildroot}}/usr/lib64/benchbig
cd {libraries} && xargs -d '\\n' -a {listing} cp --parents -t %{{buildroot}}/usr/lib64/benchbig
%files
/usr/lib64/benchbig
"""
LIBARCHIVE_BLOCKS = (64 << 10, 1 << 20)
SHF_EXECINSTR = 0x4


def optional(name: str, package: str) -> ModuleType | None:
    """The module ``name``, or ``None`` (saying so) when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError, AttributeError) as error:  # libarchive-c without libarchive
        print(
            f"skipped: {package}'s columns ({name} cannot be imported: {error}); "
            f"install it with `.venv/bin/pip install -e '.[dev]'` or `.venv/bin/pip install "
            f"{package}`"
        )
        return None


def big_rpm(mib: int) -> Path:
    """An RPM of about ``mib`` MiB of this machine's shared libraries, zstd level 19.

    Built once with rpmbuild and kept under ``.cache/bench/`` (its name carries a
    digest of the spec and of the files it takes).
    """
    chosen: list[str] = []
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in sorted(LIBRARIES.rglob("*")):
        if total >= mib * MIB:
            break
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 16 * MIB:
            continue
        if (info.st_dev, info.st_ino) in seen or "\n" in str(path):
            continue
        with path.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        seen.add((info.st_dev, info.st_ino))
        chosen.append(str(path.relative_to(LIBRARIES)))
        total += info.st_size
    digest = hashlib.sha256(BIG_SPEC.encode())
    for name in chosen:
        info = (LIBRARIES / name).stat()
        digest.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    final = CACHE / f"big-{mib}-{digest.hexdigest()[:16]}"
    found = sorted(final.glob("*.rpm"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"building the large RPM ({total / MIB:.0f} MiB of libraries, zstd -19) ...")
    work = Path(tempfile.mkdtemp(prefix=".big-", dir=CACHE))
    try:
        listing = work / "files.txt"
        listing.write_text("\n".join(chosen) + "\n")
        spec = work / "benchbig.spec"
        spec.write_text(BIG_SPEC.format(mib=mib, libraries=LIBRARIES, listing=listing))
        started = time.perf_counter()
        subprocess.run(
            [
                "rpmbuild",
                "-bb",
                "--nodeps",
                "--define",
                f"_topdir {work / 'top'}",
                "--define",
                "_binary_payload w19.zstdio",
                str(spec),
            ],
            check=True,
            capture_output=True,
            timeout=3600,
        )
        built = next((work / "top" / "RPMS").glob("*/*.rpm"))
        out = work / "out"
        out.mkdir()
        built.rename(out / built.name)
        out.rename(final)
        print(f"  built in {time.perf_counter() - started:.0f} s: {final / built.name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / built.name


# -- payload -----------------------------------------------------------------------------


def read_ours(rpms: Sequence[Path]) -> int:
    """Bytes of file data read with RpmReader (symlink targets are not counted)."""
    total = 0
    for rpm in rpms:
        with RpmReader(rpm) as reader:
            for member in reader.members():
                if member.kind != stat.S_IFREG:
                    continue
                while chunk := member.read(CHUNK):
                    total += len(chunk)
    return total


def read_libarchive(libarchive: ModuleType, rpms: Sequence[Path], block: int) -> int:
    """Bytes of file data read with libarchive, ``block`` bytes at a time."""
    total = 0
    for rpm in rpms:
        with libarchive.file_reader(str(rpm)) as archive:
            for entry in archive:
                if not entry.isreg:
                    continue
                for data in entry.get_blocks(block):
                    total += len(data)
    return total


def replace_ours(libarchive: ModuleType, rpms: Sequence[Path]) -> int:
    """What RpmReader does, with libarchive reading the payload: our header reader for
    the tags the mirror needs (libarchive does not expose them), the file's sha256, and
    libarchive at 64 KiB blocks (each a pass of its own over the file)."""
    total = 0
    for rpm in rpms:
        read_header(rpm)
        digest = hashlib.sha256()
        with rpm.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        total += read_libarchive(libarchive, [rpm], LIBARCHIVE_BLOCKS[0])
    return total


# -- ELF ---------------------------------------------------------------------------------


def elf_files(rpms: Sequence[Path]) -> list[tuple[str, bytes]]:
    """Every ELF file of the payloads, whole, with its installed path."""
    found = []
    for rpm in rpms:
        with RpmReader(rpm) as reader:
            for member in reader.members():
                if member.kind != stat.S_IFREG or member.size < 64:
                    continue
                data = member.read()
                if data[:4] == b"\x7fELF":
                    found.append(("/" + member.path, data))
    return found


class Held:
    """A file held in memory, read as a payload member is (the stream ``scan`` takes)."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(size)


def scan_ours(files: Sequence[tuple[str, bytes]]) -> list[Scanned | None]:
    return [scan(Held(data), path) for path, data in files]


@dataclass
class PyElfTools:
    """pyelftools' parts the comparison uses."""

    elf_file: Any
    note_section: Any
    error: type[Exception]

    @classmethod
    def load(cls) -> PyElfTools | None:
        elffile = optional("elftools.elf.elffile", "pyelftools")
        if elffile is None:
            return None
        sections = importlib.import_module("elftools.elf.sections")
        exceptions = importlib.import_module("elftools.common.exceptions")
        return cls(elffile.ELFFile, sections.NoteSection, exceptions.ELFError)

    def scan(self, path: str, data: bytes) -> Scanned | None:
        """What ``services.common.elf.scan`` finds, found with pyelftools."""
        try:
            elf = self.elf_file(io.BytesIO(data))
            dwz = path.lstrip("/").startswith(DWZ_DIR)
            if not dwz and elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
                return None
            build_id = None
            code_kept: list[bool] = []
            for section in elf.iter_sections():
                if section["sh_flags"] & SHF_EXECINSTR:
                    code_kept.append(section["sh_type"] != "SHT_NOBITS")
                if build_id is None and isinstance(section, self.note_section):
                    for note in section.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                            build_id = str(note["n_desc"])
                            break
        except self.error:
            return None
        if build_id is None:
            return None
        if dwz:
            kind = ElfKind.DWZ
        elif code_kept and not any(code_kept):
            kind = ElfKind.DEBUG
        else:
            kind = ElfKind.BINARY
        return Scanned(build_id, kind)

    def scan_all(self, files: Sequence[tuple[str, bytes]]) -> list[Scanned | None]:
        return [self.scan(path, data) for path, data in files]


# -- running and printing ----------------------------------------------------------------


def in_turns(contenders: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """The median time of each contender over ``runs`` rounds, each round all in turn."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seen) for name, seen in times.items()}


def shown_block(block: int) -> str:
    return f"{block // MIB} MiB" if block >= MIB else f"{block // 1024} KiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(title)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  "
            + "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


def payloads(libarchive: ModuleType | None, sets: list[tuple[str, list[Path]]], runs: int) -> None:
    header = ["payload", "RpmReader"]
    if libarchive is not None:
        header += [f"libarchive {shown_block(b)}" for b in LIBARCHIVE_BLOCKS]
        header += ["libarchive / ours", "libarchive + header + sha256", "that / ours"]
    rows = []
    for label, rpms in sets:
        data = read_ours(rpms)
        contenders: dict[str, Callable[[], object]] = {"ours": partial(read_ours, rpms)}
        if libarchive is not None:
            for block in LIBARCHIVE_BLOCKS:
                theirs = read_libarchive(libarchive, rpms, block)
                assert theirs == data, f"{label}: libarchive read {theirs} bytes, ours {data}"
                contenders[f"la{block}"] = partial(read_libarchive, libarchive, rpms, block)
            contenders["whole"] = partial(replace_ours, libarchive, rpms)
        times = in_turns(contenders, runs)
        size = sum(rpm.stat().st_size for rpm in rpms)
        row = [f"{label} ({size / MIB:.1f} MiB, {data / MIB:.1f} MiB unpacked)", ms(times["ours"])]
        if libarchive is not None:
            best = min(times[f"la{b}"] for b in LIBARCHIVE_BLOCKS)
            row += [ms(times[f"la{b}"]) for b in LIBARCHIVE_BLOCKS]
            row += [f"{best / times['ours']:.2f}"]
            row += [ms(times["whole"]), f"{times['whole'] / times['ours']:.2f}"]
        rows.append(row)
    table(f"payload: every file's data read, median of {runs} runs", header, rows)


def elves(tools: PyElfTools | None, sets: list[tuple[str, list[Path]]], runs: int) -> None:
    header = ["ELF files", "elf.scan"]
    if tools is not None:
        header += ["pyelftools", "pyelftools / ours"]
    rows = []
    for label, rpms in sets:
        files = elf_files(rpms)
        ours = scan_ours(files)
        contenders: dict[str, Callable[[], object]] = {"ours": partial(scan_ours, files)}
        if tools is not None:
            theirs = tools.scan_all(files)
            differ = [path for (path, _), a, b in zip(files, ours, theirs, strict=True) if a != b]
            assert not differ, f"{label}: pyelftools and elf.scan disagree on {differ[:5]}"
            contenders["theirs"] = partial(tools.scan_all, files)
        times = in_turns(contenders, runs)
        found = sum(1 for s in ours if s is not None)
        size = sum(len(data) for _, data in files)
        row = [
            f"{label}: {len(files)} files, {size / MIB:.1f} MiB, {found} build-ids",
            ms(times["ours"]),
        ]
        if tools is not None:
            row += [ms(times["theirs"]), f"{times['theirs'] / times['ours']:.2f}"]
        rows.append(row)
    table(f"elf: build-id and kind of each ELF file, median of {runs} runs", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each (default 7)")
    parser.add_argument("--big-mib", type=int, default=200, help="large RPM size (MiB)")
    parser.add_argument("--no-big", action="store_true", help="leave the large RPM out")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs takes a number of at least 1")
    fixtures = build_fixtures()
    sets = [(f"{len(fixtures.rpms)} fixture RPMs", sorted(r.path for r in fixtures.rpms))]
    if not args.no_big:
        big = big_rpm(args.big_mib)
        sets.append(("large RPM (benchbig)", [big]))
    libarchive = optional("libarchive", "libarchive-c")
    tools = PyElfTools.load()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    payloads(libarchive, sets, args.runs)
    elves(tools, sets, args.runs)


if __name__ == "__main__":
    main()
