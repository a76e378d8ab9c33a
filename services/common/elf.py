"""Just enough of the ELF header to tell a core dump and its architecture."""

from __future__ import annotations

import struct
from pathlib import Path

ET_CORE = 4

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


class NotACore(ValueError):
    """The file is not an ELF core dump; the message says what it is instead."""


def core_arch(path: Path) -> str:
    """The architecture of the ELF core dump at ``path``.

    Raises :class:`NotACore` when the file is not an ELF core or its machine is unknown.
    """
    with path.open("rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise NotACore("it is not an ELF file")
    byte_order = {1: "<", 2: ">"}.get(header[5])
    if byte_order is None:
        raise NotACore("its ELF header has an invalid byte order")
    e_type, e_machine = struct.unpack(byte_order + "HH", header[16:20])
    if e_type != ET_CORE:
        raise NotACore(f"it is an ELF file of type {e_type}, not a core dump")
    arch = MACHINES.get(e_machine)
    if arch is None:
        raise NotACore(f"its machine type {e_machine} is not one Retrace Server knows")
    if arch == "ppc64le" and byte_order == ">":
        arch = "ppc64"
    return arch
