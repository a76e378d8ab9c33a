"""The build-id index of one RPM, read from the ELF files in its payload.

As elfutils' debuginfod does, every ELF file the package installs (programs,
libraries, ``.debug`` files, ``.dwz`` files) is read for its GNU build-id note;
the index then finds it whatever ``%_build_id_links`` the package was built
with, and whether rpmbuild wrote a link for it or not.  The header's
``.build-id`` links are read too: a debuginfo package's link back to its binary
names where another package of the build installs it, which nothing else says.
Where a link and the file it names disagree, the file wins and the
disagreement is reported (the import log warns, ``/metrics`` counts it).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

from services.common.data.mirror import BuildIdKind, IndexEntry, IndexSource
from services.common.elf import ElfKind, scan
from services.common.rpm import header_entries
from services.common.rpmfile import RpmHeader, RpmReader

_KINDS = {
    ElfKind.BINARY: BuildIdKind.BINARY,
    ElfKind.DEBUG: BuildIdKind.DEBUG,
    ElfKind.DWZ: BuildIdKind.DWZ,
}


@dataclass
class RpmIndex:
    """An RPM's header and the build-id entries it gives the index."""

    header: RpmHeader
    entries: list[IndexEntry] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    """One sentence per header link that the file it names contradicts."""
    warnings: list[str] = field(default_factory=list)
    """Payload members the reader left out."""
    sha256: str = ""
    """The whole file's sha256, read on the way."""


def index_rpm(path: Path, sha256: str | None = None) -> RpmIndex:
    """Read the RPM at ``path`` whole: its header, and the build-id of every ELF file.

    Raises :class:`~services.common.rpmfile.PayloadError` when the RPM cannot be
    read (or, with ``sha256``, is not that file).
    """
    found: dict[str, IndexEntry] = {}
    # rpm writes a hard-linked set's data with one name; the others come empty.
    names_of: dict[int, list[str]] = {}
    with RpmReader(path, sha256) as reader:
        for member in reader.members():
            if member.kind != stat.S_IFREG:
                continue
            installed = "/" + member.path
            if member.links > 1:
                names_of.setdefault(member.inode, []).append(installed)
            if member.size < 64:
                continue
            scanned = scan(member, installed)
            if scanned is None:
                continue
            entry = IndexEntry(scanned.build_id, _KINDS[scanned.kind], installed, IndexSource.ELF)
            found[installed] = entry
    for names in names_of.values():
        known = next((found[name] for name in names if name in found), None)
        if known is not None:
            for name in names:
                found.setdefault(name, _moved(known, name))
    assert reader.sha256 is not None  # the reader closed cleanly
    result = RpmIndex(reader.header, warnings=reader.warnings, sha256=reader.sha256)
    result.entries = sorted(found.values(), key=lambda e: e.path)
    for link in header_entries(reader.header):
        content = found.get(link.path)
        if link.kind == BuildIdKind.BINARY_PATH or content is None:
            result.entries.append(link)  # all that is known: the file is not in this payload
        elif content.build_id != link.build_id:
            result.conflicts.append(
                f"{path.name}: its .build-id link says {link.path} has build-id "
                f"{link.build_id}, but the file's own note says {content.build_id}; "
                "the file's note is indexed"
            )
    return result


def _moved(entry: IndexEntry, path: str) -> IndexEntry:
    return IndexEntry(entry.build_id, entry.kind, path, entry.source)
