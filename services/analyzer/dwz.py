"""Shared DWARF: what Fedora's debug files point to in ``/usr/lib/debug/.dwz/``.

``dwz`` moves DWARF that several debug files of one build share into one file,
and each debug file names it in its ``.gnu_debugaltlink`` section (a relative
path and the shared file's build-id).  That file belongs to the build's main
``NAME-debuginfo`` package, which no module of the core may point at by itself,
and it carries no ``.build-id`` link: it is found by build-id when the index
knows it, else by the build its name spells (``NAME-VERSION-RELEASE.ARCH``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from services.common.store import BuildIdKind, Package, Store

SECTION = b".gnu_debugaltlink"


@dataclass(frozen=True)
class AltLink:
    """A debug file's reference to shared DWARF."""

    path: str  # as written in the section, relative to the debug file's folder
    build_id: str


def read_altlink(debug_file: Path) -> AltLink | None:
    """The ``.gnu_debugaltlink`` of an ELF file, or ``None`` when it has none."""
    try:
        with debug_file.open("rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return None
            order = "<" if header[5] == 1 else ">"
            (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", header, 0x3A)
            if shoff == 0 or shnum == 0 or shstrndx >= shnum:
                return None
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [
                struct.unpack_from(order + "IIQQQQ", table, i * shentsize) for i in range(shnum)
            ]
            names_at, names_size = sections[shstrndx][4], sections[shstrndx][5]
            f.seek(names_at)
            names = f.read(names_size)
            for name, _type, _flags, _addr, offset, size in sections:
                if names[name : name + len(SECTION) + 1] == SECTION + b"\0":
                    f.seek(offset)
                    data = f.read(size)
                    path, _, build_id = data.partition(b"\0")
                    return AltLink(path.decode(errors="replace"), build_id.hex())
    except (OSError, struct.error):
        return None
    return None


def _build_of(name: str) -> tuple[str, str, str, str] | None:
    stem, dot, arch = name.rpartition(".")
    parts = stem.rsplit("-", 2)
    if not dot or len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2], arch


def find_dwz_package(store: Store, link: AltLink, os_release: str) -> tuple[Package | None, str]:
    """The package holding the shared DWARF ``link`` names, and how it was chosen."""
    hits = [hit for hit in store.find_build_ids([link.build_id]) if hit.kind == BuildIdKind.DEBUG]
    if hits:
        chosen = min(hits, key=lambda h: h.package.id).package
        return chosen, f"by its build-id {link.build_id}"
    build = _build_of(Path(link.path).name)
    if build is None:
        return None, f"its name {Path(link.path).name} names no build"
    name, version, release, arch = build
    for package in store.find_packages(f"{name}-debuginfo", os_release, arch):
        if (package.nevra.version, package.nevra.release) == (version, release):
            return package, f"by its name, as the build {name}-{version}-{release}"
    return None, f"{name}-debuginfo-{version}-{release}.{arch} is not mirrored"
