"""Step 3: a root for gdb, assembled from RPMs unpacked once into a local cache.

Each RPM is unpacked once, in this process (:mod:`services.analyzer.unpack`),
into ``<cache>/entries/<sha256>/``, keyed by its content: the data of its files,
flat, and a manifest of its paths (folders, files, links).  A task's root is a
tree laid out from those manifests whose files are hard links to that data:
nothing is decompressed twice, and no folder or link is made twice either (on
the disk we measured, making one costs four to fifty hard links).  Roots are
kept too, under ``<cache>/trees/<key>/``, keyed by the ordered digests of their
packages: gdb only ever reads a root (the sandbox mounts it read-only), so a
package set seen before is served by the same tree.

A root may take only some files of a package (``only``: the debug files a crash
needs out of a debuginfo package of hundreds of MiB).  Its entry then holds the
data of those files alone and the paths of all; a later root that needs other
files of it has them written into the same entry (:func:`~services.analyzer.unpack.fill_rpm`).
A kept root's key names the files it took, so it is never served to a crash that
needs others.

The cache has a size bound.  A task holds a shared lock on each entry it uses
(:meth:`RootCache.lease`); beyond the bound, the least recently used entries that
no task holds are removed.  Every thread and process on the host follows the
same locks: open-file-description locks on bytes of one file, ``.locks``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from services.analyzer.unpack import DIR, FILE, LINK, Entry, fill_rpm, shown, unpack_rpm
from services.common.data.mirror import Package
from services.common.rpmfile import RpmHeader, read_header

log = logging.getLogger(__name__)

UNPACK_WORKERS = 2 * (os.cpu_count() or 1)
MANIFEST = "manifest"
ROOT_INFO = "root.json"
MAX_LINK_HOPS = 8
ABANDONED_AFTER = 6 * 3600
"""Seconds after which a folder still being unpacked or built was left by a killed process."""
OLD_LAYOUTS = ("rpms", "packages", "roots")
"""Folders of the cache's earlier layouts, unused since: a tree per RPM (``rpms``), then
entries whose manifests an older analyzer would read as whole although this one keeps
some data out of them (``packages``, ``roots``).  Analyzers of both versions on one host
during an upgrade use separate folders, never each other's entries."""


Only = Mapping[str, frozenset[str]]
"""The packages of a root that it takes only some files of: each one's sha256, and
those files' paths (absolute, as the package installs them; links are followed)."""


@dataclass(frozen=True)
class UnpackedPackage:
    """One RPM in the cache: where its file data lies, and the paths it installs."""

    folder: Path
    size: int
    warnings: tuple[str, ...]
    entries: tuple[Entry, ...]
    absent: frozenset[str] = frozenset()
    """Data not written yet: the names the file entries give it."""

    @classmethod
    def load(cls, folder: Path) -> UnpackedPackage:
        """The entry in ``folder``, as :meth:`save` wrote it."""
        with (folder / MANIFEST).open() as manifest:
            header = json.loads(manifest.readline())
            entries = tuple(Entry(*entry) for entry in json.loads(manifest.readline()))
            absent = manifest.readline()  # none before partial entries were kept
        names = frozenset(json.loads(absent)) if absent else frozenset()
        return cls(folder, header["size"], tuple(header["warnings"]), entries, names)

    @staticmethod
    def size_of(folder: Path) -> int:
        """The size :meth:`save` recorded in ``folder``, reading only the manifest's first line."""
        with (folder / MANIFEST).open() as manifest:
            return int(json.loads(manifest.readline())["size"])

    def save(self, folder: Path) -> None:
        """Write the manifest into ``folder``, whole or not at all: a line of JSON with
        the size and warnings (all eviction reads), a line with the entries, a line with
        the data not written."""
        header = {"size": self.size, "warnings": list(self.warnings)}
        entries = [[e.kind, e.path, e.value] for e in self.entries]
        partial = folder / f".{MANIFEST}-{secrets.token_hex(4)}"
        with partial.open("w") as manifest:
            manifest.write(f"{json.dumps(header)}\n{json.dumps(entries)}\n")
            manifest.write(f"{json.dumps(sorted(self.absent))}\n")
        partial.replace(folder / MANIFEST)

    @cached_property
    def _by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self.entries}

    def file_at(self, path: str) -> Entry | None:
        """The file entry installed at ``path``, following this package's own links."""
        by_path = self._by_path
        real = real_path(
            path, lambda p: e.value if (e := by_path.get(p)) and e.kind == LINK else None
        )
        entry = by_path.get(real) if real is not None else None
        return entry if entry is not None and entry.kind == FILE else None

    def find(self, path: str) -> Path | None:
        """The data of the file installed at ``path``, following this package's own links;
        None if there is no such file or its data was not written."""
        entry = self.file_at(path)
        if entry is None or entry.value in self.absent:
            return None
        return self.folder / entry.value

    def data_of(self, paths: Iterable[str]) -> frozenset[str]:
        """The names of the data of the files installed at ``paths``."""
        return frozenset(e.value for path in paths if (e := self.file_at(path)) is not None)

    def lacking(self, paths: Iterable[str] | None) -> frozenset[str]:
        """The data not written yet of the files at ``paths`` (of every file with None)."""
        if not self.absent:
            return frozenset()
        return self.absent if paths is None else self.data_of(paths) & self.absent


def real_path(path: str, link_of: Callable[[str], str | None]) -> str | None:
    """``path`` (relative to ``/``) with the links ``link_of`` knows followed, up to
    :data:`MAX_LINK_HOPS`; None when they go round."""
    wanted = posixpath.normpath(path).lstrip("/")
    for _ in range(MAX_LINK_HOPS):
        target = link_of(wanted)
        if target is None:
            return wanted
        base = "/" if target.startswith("/") else posixpath.dirname(f"/{wanted}")
        wanted = posixpath.normpath(posixpath.join(base, target)).lstrip("/")
    return None


class _Flock(ctypes.Structure):
    """``struct flock`` of ``fcntl(2)``, laid out by the C compiler's rules."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    )


class _Locks:
    """Named locks, each one byte of one file, held by open file description.

    Unlike ``flock`` on a file per name, nothing is created per name; unlike
    classic POSIX record locks, two threads of one process exclude each other,
    and closing one descriptor does not drop another's locks.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        path.touch()

    @contextmanager
    def held(self, names: list[str], *, shared: bool = False) -> Iterator[None]:
        """Wait for and hold the locks ``names`` until the block ends."""
        fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for name in sorted(set(names)):  # one order everywhere: no deadlock
                self._set(fd, name, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, wait=True)
            yield
        finally:
            os.close(fd)  # releases them all

    @contextmanager
    def try_exclusive(self, name: str) -> Iterator[bool]:
        """Hold ``name`` alone if no one holds it now; say whether it is held."""
        fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        try:
            yield self._set(fd, name, fcntl.F_WRLCK, wait=False)
        finally:
            os.close(fd)

    @staticmethod
    def _set(fd: int, name: str, kind: int, *, wait: bool) -> bool:
        offset = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
        request = _Flock(l_type=kind, l_whence=os.SEEK_SET, l_start=offset, l_len=1, l_pid=0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, bytes(request))
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held elsewhere
            return False
        return True


class WorkFolders:
    """The work folders of retrace attempts (``<root>/<task>-<random>``), in one folder
    that every analyzer process of the host shares.

    Each folder is held for its whole life by a lock of its own (an open-file-
    description lock on one byte of ``<root>/.locks``), taken before the folder is
    made and given back after it is removed.  The kernel drops a process's locks
    however it ends, SIGKILL included, so a folder whose lock is free was left by a
    dead process: :meth:`sweep`, run when an analyzer starts, removes exactly those,
    never one a live process (another analyzer, a ``retrace-analyzer shell``) holds.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._root = root
        self._locks = _Locks(root / ".locks")

    @contextmanager
    def held(self, prefix: str) -> Iterator[Path]:
        """A new, empty folder named ``<prefix>-<random>``, removed when the block ends."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        with self._locks.held([f"work {name}"]):
            folder = self._root / name
            folder.mkdir()
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Remove the folders no live process holds; return their names."""
        removed = []
        for entry in self._root.iterdir():
            if entry.name.startswith("."):
                continue  # the lock file
            with self._locks.try_exclusive(f"work {entry.name}") as free:
                if free:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        for name in removed:
            log.info("removed %s, left in %s by an analyzer that died", name, self._root)
        return removed


class RootCache:
    """Unpacked RPMs on this host, shared by every analyzer process here."""

    def __init__(self, cache_dir: Path, repo: Path, max_bytes: int | None = None) -> None:
        self._packages = cache_dir / "entries"
        self._roots = cache_dir / "trees"
        self._repo = repo
        self._max_bytes = max_bytes
        self._packages.mkdir(parents=True, exist_ok=True)
        self._roots.mkdir(parents=True, exist_ok=True)
        self._locks = _Locks(cache_dir / ".locks")
        self._background = ThreadPoolExecutor(UNPACK_WORKERS, thread_name_prefix="unpack")
        self._grown = False  # data was written since the last eviction
        for old in OLD_LAYOUTS:
            if (cache_dir / old).exists():
                log.warning("%s is left from an older cache layout; it can be removed", old)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what killed processes left: folders being removed, or long abandoned."""
        abandoned = time.time() - ABANDONED_AFTER
        for folder in (self._packages, self._roots):
            for left in folder.iterdir():
                try:
                    doomed = left.name.startswith(".evicted-") or (
                        left.name.startswith((".unpack-", ".root-"))
                        and left.stat().st_mtime < abandoned
                    )
                except FileNotFoundError:
                    continue  # another analyzer finished with it just now
                if doomed:
                    shutil.rmtree(left, ignore_errors=True)

    @contextmanager
    def lease(self, packages: list[Package]) -> Iterator[None]:
        """Hold ``packages``' entries in use: eviction skips them until the block ends."""
        with self._locks.held([f"use {p.sha256}" for p in packages], shared=True):
            yield

    def size(self) -> int:
        """Bytes held by the complete entries, as counted when each was unpacked."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for entry in self._packages.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                used = (entry / MANIFEST).stat().st_mtime
                size = UnpackedPackage.size_of(entry)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            entries.append((used, size, entry))
        return sorted(entries)

    def evict(self) -> list[str]:
        """Remove least recently used entries no task holds until the cache fits its bound.

        Returns the removed entries' keys.
        """
        if self._max_bytes is None:
            return []
        removed: list[str] = []
        with self._locks.held(["evict"]):
            entries = self._entries()
            total = sum(size for _, size, _ in entries)
            for _, size, entry in entries:
                if total <= self._max_bytes:
                    break
                with self._locks.try_exclusive(f"use {entry.name}") as free:
                    if not free:
                        continue  # a running task uses it
                    # Out of sight while the lock is held: a task leasing the entry
                    # next finds neither it nor a kept root built on it.
                    doomed = [_retire(entry)] + [_retire(r) for r in self._roots_with(entry.name)]
                for path in doomed:
                    shutil.rmtree(path, ignore_errors=True)
                total -= size
                removed.append(entry.name)
        for key in removed:
            log.info("evicted %s from the root cache", key)
        return removed

    def header(self, package: Package) -> RpmHeader:
        """``package``'s header, read from the repository (its payload is not read)."""
        return read_header(self._repo / package.path)

    def unpacked(
        self, package: Package, only: frozenset[str] | None = None
    ) -> tuple[UnpackedPackage, bool]:
        """``package``'s files, unpacking it if needed; with ``only`` (paths), the data
        of those files alone, of every file without.

        Returns them and whether this call wrote any data.  Two threads or
        processes asking at once unpack it once: the second waits for the first.
        Raises :class:`~services.analyzer.unpack.PayloadError` when the RPM
        cannot be unpacked.
        """
        final = self._packages / package.sha256
        cached = self._load(final)
        if cached is not None and not cached.lacking(only):
            return cached, False
        with self._locks.held([f"unpack {package.sha256}"]):
            cached = self._load(final)
            if cached is None:
                result = self._unpack(package, final, only)
            else:
                lacking = cached.lacking(only)
                if not lacking:
                    return cached, False
                result = self._fill(package, cached, lacking)
        self._grown = True
        return result, True

    def _unpack(
        self, package: Package, final: Path, only: frozenset[str] | None
    ) -> UnpackedPackage:
        rpm = self._repo / package.path
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self._packages))
        try:
            wanted = None if only is None else self._real_paths(package, only)
            unpacked = unpack_rpm(rpm, staging, package.sha256, wanted)
            result = UnpackedPackage(
                final,
                unpacked.size,
                tuple(unpacked.warnings),
                tuple(unpacked.entries),
                frozenset(unpacked.absent),
            )
            lacking = result.lacking(only)
            if lacking:  # a hard link whose data came before the name asked for
                result = self._fill(package, replace(result, folder=staging), lacking)
                result = replace(result, folder=final)
            result.save(staging)
            if final.exists():  # a damaged entry
                shutil.rmtree(final)
            staging.replace(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return result

    def _fill(
        self, package: Package, cached: UnpackedPackage, names: frozenset[str]
    ) -> UnpackedPackage:
        """Write the data ``names`` into ``cached``'s folder; save its manifest so."""
        written = fill_rpm(self._repo / package.path, cached.folder, package.sha256, names)
        result = replace(cached, size=cached.size + written, absent=cached.absent - names)
        result.save(cached.folder)
        return result

    def _real_paths(self, package: Package, paths: frozenset[str]) -> frozenset[str]:
        """``paths`` relative to ``/`` with the package's links followed, by its header."""
        header = self.header(package)
        links = {
            path.lstrip("/"): target
            for path, target in zip(header.files, header.link_targets, strict=True)
            if target
        }
        real = (real_path(path, links.get) for path in paths)
        return frozenset(path for path in real if path is not None)

    def prefetch(
        self, packages: list[Package], only: Only
    ) -> dict[str, Future[tuple[UnpackedPackage, bool]]]:
        """Start unpacking ``packages`` (of those in ``only``, the files named there) in
        background threads, side by side; return each one's future by its sha256.

        A later :meth:`unpacked` or :meth:`assemble` finds what is done and waits for
        what is under way.  Hold a :meth:`lease` on ``packages`` meanwhile.
        """
        return {p.sha256: self._background.submit(self._prefetch, p, only) for p in packages}

    def _prefetch(self, package: Package, only: Only) -> tuple[UnpackedPackage, bool]:
        # Its own lease: the task that asked may have ended (and let go of its own)
        # before this job runs; eviction must still leave the entry alone meanwhile.
        with self.lease([package]):
            return self.unpacked(package, only.get(package.sha256))

    @staticmethod
    def settle(pending: Iterable[Future[tuple[UnpackedPackage, bool]]]) -> None:
        """Cancel the :meth:`prefetch` jobs not started yet and wait for the others: a
        task that ends leaves none of its unpacking behind (nor ahead of the next task's)."""
        running = [future for future in pending if not future.cancel()]
        futures.wait(running)

    @staticmethod
    def _load(entry: Path) -> UnpackedPackage | None:
        """The complete entry at ``entry``, marked used now; None if there is none."""
        if not _mark_used(entry / MANIFEST):
            return None  # not unpacked yet, or evicted meanwhile
        try:
            return UnpackedPackage.load(entry)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            log.warning("%s is damaged (%s); it is unpacked again", entry / MANIFEST, error)
            return None

    def _roots_with(self, key: str) -> list[Path]:
        """The kept roots built on the entry ``key``."""
        found = []
        for kept in self._roots.iterdir():
            if kept.name.startswith("."):
                continue  # being built or being removed
            try:
                keys = json.loads((kept / ROOT_INFO).read_text())["packages"]
            except (OSError, ValueError, KeyError):
                continue
            if key in keys:
                found.append(kept)
        return found

    def assemble(self, packages: list[Package], root: Path, only: Only | None = None) -> list[str]:
        """Make ``root`` (which must not exist) the root of ``packages``; return warnings.

        ``root`` becomes a link to the kept root of this package set, built now
        unless it was built before.  A path two packages both ship comes from the
        first in ``packages``.  Of a package in ``only``, the root takes the files
        named there (and every folder and link).  Hold a :meth:`lease` on
        ``packages`` while the root is in use.
        """
        only = only or {}
        keys = [p.sha256 for p in packages]
        key = [f"{k} {json.dumps(sorted(only[k]))}" if k in only else k for k in keys]
        name = hashlib.sha256("\n".join(key).encode()).hexdigest()
        kept = self._roots / name
        if not (kept / ROOT_INFO).exists():
            with self._locks.held([f"root {name}"]):
                if not (kept / ROOT_INFO).exists():
                    self._build_root(packages, kept, only)
        _mark_used(kept / ROOT_INFO)
        root.parent.mkdir(parents=True, exist_ok=True)
        root.symlink_to(kept / "tree")
        return list(json.loads((kept / ROOT_INFO).read_text())["warnings"])

    def _build_root(self, packages: list[Package], kept: Path, only: Only) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".root-", dir=self._roots))
        try:
            # Unpacking is one decompressor per RPM: run them side by side.
            with ThreadPoolExecutor(max_workers=UNPACK_WORKERS) as pool:
                unpacked = list(pool.map(lambda p: self.unpacked(p, only.get(p.sha256)), packages))
            layout = _Layout(staging / "tree")
            for package, (files, _) in zip(packages, unpacked, strict=True):
                layout.warnings += files.warnings
                paths = only.get(package.sha256)
                data = None if paths is None else files.data_of(paths)
                layout.place(files, str(package.nevra), data)
            info = {"packages": [p.sha256 for p in packages], "warnings": layout.warnings}
            (staging / ROOT_INFO).write_text(json.dumps(info))
            if self._grown:  # here or in a prefetch
                self._grown = False
                self.evict()  # the new root's hard links keep its files, whatever goes
            if kept.exists():  # left by an interrupted build
                shutil.rmtree(kept)
            staging.replace(kept)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


ENTRY_ERRORS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EINVAL})
"""What makes one path of a package impossible to place (it is skipped with a warning);
any other error is the disk's, and the root is not built."""


def _taken(package: UnpackedPackage, entry: Entry, only: frozenset[str]) -> bool:
    """Whether a root that takes the data ``only`` of ``package`` takes ``entry``."""
    if entry.kind == FILE:
        return entry.value in only
    if entry.kind == LINK:
        file = package.file_at(entry.path)
        return file is not None and file.value in only
    return False  # a folder: made when something inside it is


def _link_or_copy(data: str, path: str) -> None:
    try:
        os.link(data, path)
    except OSError as error:
        if error.errno != errno.EMLINK:
            raise
        shutil.copy2(data, path)  # the data's inode has as many names as the disk allows


def _mark_used(path: Path) -> bool:
    """Set ``path``'s time to now, for eviction; say whether it exists.

    Another user's file (someone's ``retrace-analyzer shell``) keeps its time: it is
    read all the same.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        pass
    return True


def _retire(path: Path) -> Path:
    """Move ``path`` aside, under a name nothing looks up, for removal."""
    doomed = path.parent / f".evicted-{path.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    path.replace(doomed)
    return doomed


class _Layout:
    """A root being laid out from packages' manifests, one package after another.

    Each folder is made once (remembered with where it really is), each file is a
    hard link to the cached data, each link is made with a target that resolves
    inside the root.  What is already there stays: the first package to ship a
    path wins.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self._root = str(root)
        self._real_root = os.path.realpath(root)
        self._folders: dict[str, str] = {"": self._real_root}
        self._outside: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        self.warnings: list[str] = []

    def place(
        self, package: UnpackedPackage, origin: str, only: frozenset[str] | None = None
    ) -> None:
        """Lay out ``package``'s paths; with ``only`` (names of data), only the files of
        that data, the links that lead to them, and the folders above those: the rest
        of a debuginfo package's hundreds of paths would only cost making them."""
        data = str(package.folder)
        for entry in package.entries:
            if only is not None and not _taken(package, entry, only):
                continue
            if entry.kind == DIR:
                self._folder(entry.path, origin)
                continue
            parent, _, _ = entry.path.rpartition("/")
            real_parent = self._folder(parent, origin)
            if real_parent is None:
                continue
            path = f"{self._root}/{entry.path}"
            try:
                if entry.kind == FILE:
                    _link_or_copy(f"{data}/{entry.value}", path)
                elif entry.kind == LINK:
                    os.symlink(self._target(entry.value, real_parent), path)  # noqa: PTH211
            except FileExistsError:
                pass  # an earlier package shipped it
            except OSError as error:
                if error.errno not in ENTRY_ERRORS:
                    raise  # the disk's problem (full, failing): no root is kept from it
                self._warn(origin, entry.path, f"cannot be made here ({error.strerror})")

    def _target(self, target: str, real_parent: str) -> str:
        """``target`` made relative, resolving inside the root as on the crashed machine.

        On that machine a relative target starts from where the folder really is and
        ``..`` stops at ``/``; an absolute one left absolute here would lead gdb to
        the analyzer host's own file of that name.  Every link made this way climbs
        at most to the root, so following links never leaves it.
        """
        here = real_parent[len(self._real_root) :] or "/"
        wanted = "/" + posixpath.normpath(posixpath.join(here, target)).lstrip("/")
        return posixpath.relpath(self._real_root + wanted, real_parent)

    def _folder(self, path: str, origin: str) -> str | None:
        """Make the folder ``path`` and those above it if needed.

        Returns where it really is, or None if it cannot be used.
        """
        known = self._folders.get(path)
        if known is not None or path in self._outside:
            return known
        parts = path.split("/")
        depth = len(parts) - 1  # the deepest folder above ``path`` already made
        while "/".join(parts[:depth]) not in self._folders:
            if "/".join(parts[:depth]) in self._outside:
                return None
            depth -= 1
        real = self._folders["/".join(parts[:depth])]
        for end in range(depth + 1, len(parts) + 1):
            made = self._make_folder("/".join(parts[:end]), parts[end - 1], real, origin)
            if made is None:
                return None
            real = made
        return real

    def _make_folder(self, path: str, name: str, real_parent: str, origin: str) -> str | None:
        made = f"{self._root}/{path}"
        try:
            os.mkdir(made, 0o755)  # noqa: PTH102 -- strings on the hot path
            real = f"{real_parent}/{name}"
        except FileExistsError:
            # A link an earlier package made (lib64 -> usr/lib64) may lead here; it
            # must lead to a folder inside the root.  Where it leads to nothing yet, a
            # later package may still make that folder.
            resolved = os.path.realpath(made)
            if not f"{resolved}/".startswith(f"{self._real_root}/"):
                self._outside.add(path)
                self._warn(origin, path, "leads outside the root")
                return None
            if not Path(resolved).is_dir():
                self._warn(origin, path, "is not a folder here")
                return None
            real = resolved
        except OSError as error:
            if error.errno not in ENTRY_ERRORS:
                raise
            self._warn(origin, path, f"cannot be made here ({error.strerror})")
            return None
        self._folders[path] = real
        return real

    def _warn(self, origin: str, path: str, problem: str) -> None:
        if (origin, path) not in self._warned:
            self._warned.add((origin, path))
            self.warnings.append(f"{origin}: /{shown(path)} {problem}; skipped")
