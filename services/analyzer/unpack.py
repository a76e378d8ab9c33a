"""Unpacking an RPM into the root cache: each file's data written once, flat.

Most packages hold a handful of files, so two process starts per RPM (``rpm2cpio |
cpio``) cost more than the unpacking itself; and on a disk where making a file,
folder or link costs far more than a hard link, making every folder and link once
in the cache and again in the root doubles the work.  So the RPM is read in this
process (:mod:`services.common.rpmfile`, the reader the mirror uses too) and only
each regular file's data is written, flat, to the destination; the paths, folders
and links come back as a list of :class:`Entry`.  Set-id bits are dropped;
devices, FIFOs and odd links are skipped, each with a warning.

A root rarely needs every file of a debuginfo package: a crash needs the debug
files of its own modules, a few out of hundreds of MiB.  With ``only``, the other
files' data is not written; their entries still name it (each file's data is
named by its member's place in the archive, the same on every read), and
:func:`fill_rpm` writes what a later crash needs, reading the RPM again.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from services.common.rpmfile import Member, PayloadError, RpmReader, shown

__all__ = [
    "DIR",
    "FILE",
    "LINK",
    "Entry",
    "PayloadError",
    "Unpacked",
    "fill_rpm",
    "shown",
    "unpack_rpm",
]

# Readable by the sandbox's user, never set-id, never writable by others.
FILE_MODE_MASK = 0o755
FILL_PREFIX = ".fill-"
"""Data a fill writes, named so until the RPM's digest is checked."""
MAX_LINK_TARGET = 4096

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
    absent: set[str] = field(default_factory=set)
    """Data left out (``only``): the names the entries give it, not written."""


def unpack_rpm(
    rpm: Path, dest: Path, sha256: str | None = None, only: frozenset[str] | None = None
) -> Unpacked:
    """Read the RPM at ``rpm``: its paths, and its files' data written to ``dest``.

    ``dest`` (an empty folder) stays flat: the data of a file is written to
    ``dest/<n>``, ``n`` its member's place in the archive, with the file's
    permissions and time; folders and links exist only as :class:`Entry` values.
    Laying the paths out is for the caller, which can then place them straight
    where they belong (a root is built of hard links to these files), so that no
    folder or link is made twice.  With ``only`` (paths relative to ``/``, as
    entries name them), only those files' data is written; the rest is listed in
    :attr:`Unpacked.absent`.  With ``sha256``, the whole file must have that
    digest (the one the mirror recorded) or the unpacking fails; the caller then
    discards what was written.
    """
    with RpmReader(rpm, sha256) as reader:
        return _Extractor(reader, dest, only=only).run()


def fill_rpm(rpm: Path, dest: Path, sha256: str | None, names: frozenset[str]) -> int:
    """Write into ``dest`` the data ``names`` that :func:`unpack_rpm` left out there.

    The files are written aside (``.fill-<name>``) and renamed into place only once
    the whole RPM has been read and its digest checked, so that ``dest`` never holds
    a file half written or read from an RPM that is not the one recorded; on any
    error the files aside are removed.  Returns the bytes written.
    """
    extractor: _Extractor | None = None
    try:
        with RpmReader(rpm, sha256) as reader:
            extractor = _Extractor(reader, dest, fill=names)
            size = extractor.run().size
    except BaseException:
        for name in names:
            Path(dest, f"{FILL_PREFIX}{name}").unlink(missing_ok=True)
        raise
    for name in extractor.written:
        os.replace(f"{dest}/{FILL_PREFIX}{name}", f"{dest}/{name}")  # noqa: PTH105
    return size


class _Extractor:
    def __init__(
        self,
        reader: RpmReader,
        dest: Path,
        *,
        only: frozenset[str] | None = None,
        fill: frozenset[str] | None = None,
    ) -> None:
        self._reader = reader
        self._dest = str(dest)
        self._only = only
        self._fill = fill
        # One list, so that the reader's warnings and ours stay in archive order.
        self._result = Unpacked(warnings=reader.warnings)
        self._place = 0  # the current member's place in the archive: its data's name
        # Hard links: rpm writes the data with one name of the set (the last) and none
        # with the others.
        self._linked_data: dict[int, str] = {}
        self._linked_waiting: dict[int, list[tuple[str, int, int, int]]] = {}
        self._wanted_inodes: set[int] = set()
        self.written: list[str] = []
        """The data a fill wrote aside, for :func:`fill_rpm` to rename."""

    def run(self) -> Unpacked:
        for place, member in enumerate(self._reader.members()):
            self._place = place
            kind = member.kind
            if kind == stat.S_IFDIR:
                self._result.entries.append(Entry(DIR, member.path))
            elif kind == stat.S_IFLNK:
                self._link(member)
            elif kind == stat.S_IFREG:
                self._file(member)
            else:
                self._warn(member.path, "is a device, FIFO or socket; skipped")
        for names in self._linked_waiting.values():  # a set whose files are all empty
            _, mode, mtime, place = names[0]
            data = str(place)
            if self._fill is None:  # written by the first reading, whatever it kept
                self._write_data(None, data, mode, mtime)
            self._result.entries += [Entry(FILE, name, data) for name, _, _, _ in names]
        return self._result

    def _link(self, member: Member) -> None:
        if member.size > MAX_LINK_TARGET:
            self._warn(member.path, f"is a link with a {member.size}-byte target; skipped")
            return
        target = member.read()
        if target and b"\0" not in target:
            self._result.entries.append(Entry(LINK, member.path, os.fsdecode(target)))
            if self._fill is None:
                self._result.size += member.size
        else:
            self._warn(member.path, "is a link with an empty or NUL-bearing target; skipped")

    def _file(self, member: Member) -> None:
        path, inode, links = member.path, member.inode, member.links
        if links > 1 and member.size == 0:
            if self._only is not None and path in self._only:
                self._wanted_inodes.add(inode)
            data = self._linked_data.get(inode)
            if data is None:
                name = (path, member.mode, member.mtime, self._place)
                self._linked_waiting.setdefault(inode, []).append(name)
            else:
                self._result.entries.append(Entry(FILE, path, data))
            return
        data = str(self._place)
        if self._keeps(path, inode, data):
            self._write_data(member, data, member.mode, member.mtime)
        else:
            self._result.absent.add(data)
        self._result.entries.append(Entry(FILE, path, data))
        if links > 1:
            self._linked_data[inode] = data
            for waiting, _, _, _ in self._linked_waiting.pop(inode, []):
                self._result.entries.append(Entry(FILE, waiting, data))

    def _keeps(self, path: str, inode: int, data: str) -> bool:
        if self._fill is not None:
            return data in self._fill
        return self._only is None or path in self._only or inode in self._wanted_inodes

    def _warn(self, path: str, text: str) -> None:
        self._result.warnings.append(f"{self._reader.name}: /{shown(path)} {text}")

    def _write_data(self, member: Member | None, name: str, mode: int, mtime: int) -> None:
        # A fill writes beside data that roots already link to: aside, renamed later.
        aside = self._fill is not None
        path = f"{self._dest}/{FILL_PREFIX if aside else ''}{name}"
        with open(path, "wb" if aside else "xb") as out:  # noqa: PTH123 -- hot path
            if member is not None:
                member.copy_to(out)
                self._result.size += member.size
            out.flush()
            os.fchmod(out.fileno(), (mode & FILE_MODE_MASK) | stat.S_IRUSR)
            os.utime(out.fileno(), (mtime, mtime))
        if aside:
            self.written.append(name)
        self._result.files += 1
