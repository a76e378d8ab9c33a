"""Step 2: which packages serve the core — found in one place, in one order.

For each module of the core (every program and library the process had mapped):

1. **The ELF index, by build-id.**  The mirror read the build-id note of every
   ELF file of every package, so a module's binary and its debug file are found
   whatever ``.build-id`` links the packages were built with.
2. **The binary of the same build, by path.**  A module whose debug file is known
   but not its binary (its package was indexed from header links alone): the
   binary package of the debuginfo's build that installs the path named by the
   debuginfo's ``.build-id`` link, by the debug file's own path, or by the core.
3. **Debug files by path.**  A binary whose debug file has no build-id entry: the
   debuginfo of its build that installs ``/usr/lib/debug<path>…debug``.
4. **The hint packages**: the crash's ``package`` and ``packages`` files name
   builds; a module still unplaced is looked for inside their binary packages, by
   its build-id note or, lacking one, by its path.

Every module's binary goes into the root whenever one is found, with or without
its debuginfo: gdb unwinds through a library with its ``.eh_frame`` and names its
functions from ``.dynsym`` or MiniDebugInfo.  Then the release's base packages
(the ``/lib64 → usr/lib64`` links of ``filesystem``) and, in
:func:`find_shared_dwarf`, the ``.dwz`` files the debug files point to, by
build-id, by indexed path, or by the build their name spells.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from schemas.nvr import ARCHES, Nvr, parse_nvr
from services.analyzer.coredump import Module
from services.analyzer.rootcache import Only, RootCache, UnpackedPackage
from services.common.data.mirror import BuildIdHit, BuildIdKind, MirrorData, Package
from services.common.elf import NotElf, build_id_of, open_elf
from services.common.rpm import os_release_of
from services.common.rpmfile import PayloadError

# Packages without build-ids that every root needs: the merged-/usr links
# (/lib64 → usr/lib64) through which a core records the dynamic loader.
BASE_PACKAGES = ("filesystem",)
MAX_HINTS = 64
DEBUG_DIR = "/usr/lib/debug"
DWZ_DIR = f"{DEBUG_DIR}/.dwz/"
_ARCHES = "|".join(ARCHES)
# A debug file's name: the binary's, then "-VERSION-RELEASE.ARCH" (Fedora), then ".debug".
_DEBUG_SUFFIX = re.compile(rf"(-[^/-]+-[^/-]+\.({_ARCHES}))?\.debug$")
_FEDORA = re.compile(r"Fedora(?: Linux)? release (?P<version>\d+|Rawhide)", re.IGNORECASE)
_VERSION_ID = re.compile(r"^VERSION_ID=\"?(?P<version>\d+)\"?$", re.MULTILINE)
_FEDORA_ID = re.compile(r"^ID=\"?fedora\"?$", re.MULTILINE)


Build = Nvr
"""A build a hint names: a package's NVR, or its build's."""


def parse_hint(text: str) -> Build | None:
    """``NAME-[EPOCH:]VERSION-RELEASE[.ARCH]`` as a build, or ``None`` if it is not one."""
    nvr = parse_nvr(text)
    return None if nvr is None else Nvr(nvr.name, nvr.version, nvr.release)


def read_hints(crash_dir: Path) -> list[Build]:
    """The builds named by the crash directory's ``package`` and ``packages`` files."""
    builds: list[Build] = []
    for name in ("package", "packages"):
        try:
            lines = (crash_dir / name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines[:MAX_HINTS]:
            words = line.split()
            build = parse_hint(words[0]) if words else None
            if build is not None and build not in builds:
                builds.append(build)
    return builds


def declared_release(crash_dir: Path) -> str | None:
    """The release the crash directory declares (``fedora-40``), if it names Fedora's.

    A crash in a container declares the container's in ``os_release_in_rootdir``,
    which comes before the host's ``os_release``.
    """
    for name in ("os_release_in_rootdir", "os_release"):
        try:
            text = (crash_dir / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = _FEDORA.search(text)
        if match:
            return f"fedora-{match['version'].lower()}"
        version = _VERSION_ID.search(text)
        if version and _FEDORA_ID.search(text):
            return f"fedora-{version['version']}"
    return None


@dataclass(frozen=True)
class Served:
    """Which packages serve one module, and how each was found."""

    module: Module
    binary: Package | None
    debug: Package | None
    binary_how: str = ""
    debug_how: str = ""
    debug_path: str | None = None
    """Where the debug file is installed, when the index knows it."""


@dataclass
class Resolution:
    """The package set for a core, and what could not be found."""

    served: list[Served] = field(default_factory=list)
    extra: list[Package] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    os_release: str | None = None
    only: dict[int, frozenset[str]] = field(default_factory=dict)
    """Packages (by id) the root takes some files of: those files' paths."""

    def only_by_digest(self) -> Only:
        """:attr:`only` as the root cache keys it: by each package's sha256."""
        return {p.sha256: self.only[p.id] for p in self.packages if p.id in self.only}

    @property
    def packages(self) -> list[Package]:
        """Every package the root needs, each once, in a stable order."""
        seen: dict[int, Package] = {}
        for s in self.served:
            for package in (s.binary, s.debug):
                if package is not None:
                    seen.setdefault(package.id, package)
        for package in self.extra:
            seen.setdefault(package.id, package)
        # gdb prints no source text here: debugsource packages would only cost unpacking.
        wanted = (p for p in seen.values() if not p.nevra.name.endswith("-debugsource"))
        return sorted(wanted, key=lambda p: (p.nevra.name, p.id))

    @property
    def missing_debug(self) -> list[Module]:
        """Modules (other than the vDSO) whose debug information was not found."""
        return [s.module for s in self.served if s.debug is None and not s.module.is_vdso]

    def has_build(self, build: Build) -> bool:
        """Whether a package found for the core is of ``build`` (by its name or its build's)."""
        for package in self.packages:
            nevra = package.nevra
            if (nevra.name, nevra.version, nevra.release) == (
                build.name,
                build.version,
                build.release,
            ) or package.source_nvr == str(build):
                return True
        return False


def _choose(build_id: str, hits: list[BuildIdHit], notes: list[str]) -> BuildIdHit | None:
    if not hits:
        return None
    # Deterministic: the package mirrored first (lowest id) wins.
    ordered = sorted(hits, key=lambda h: (h.package.id, h.path))
    chosen = ordered[0]
    others = sorted({str(h.package.nevra) for h in ordered if h.package.id != chosen.package.id})
    if others:
        notes.append(
            f"build-id {build_id} is in several packages; chose {chosen.package.nevra} "
            f"(mirrored first) over {', '.join(others)}"
        )
    return chosen


class Finder:
    """Finds the packages of one core; one instance per retrace."""

    def __init__(
        self, index: MirrorData, cache: RootCache, arch: str, crash_dir: Path | None = None
    ) -> None:
        self._index = index
        self._cache = cache
        self._arch = arch
        self._hints = read_hints(crash_dir) if crash_dir is not None else []
        self._declared = declared_release(crash_dir) if crash_dir is not None else None
        self._links: dict[tuple[str, int], str] = {}
        self._files: dict[int, frozenset[str]] = {}  # package id -> its paths, read once
        self.pending: list[Future[tuple[UnpackedPackage, bool]]] = []
        """Unpacking started for the root (:meth:`RootCache.settle` them at the end)."""

    @property
    def declared_release(self) -> str | None:
        """The release the crash directory declares, if any."""
        return self._declared

    @property
    def crashed_build(self) -> Build | None:
        """The build the crash's ``package`` file names (first of the hints)."""
        return self._hints[0] if self._hints else None

    def find(self, modules: list[Module]) -> Resolution:
        """Every module's packages, in the order of this module's docstring."""
        result = Resolution()
        result.served = self._by_build_id(modules, result.notes)
        result.served = [self._binary_by_path(s) for s in result.served]
        result.served = [self._debug_by_path(s) for s in result.served]
        self._by_hints(result)
        self._releases(result)
        return result

    # -- 1. the ELF index ------------------------------------------------------

    def _by_build_id(self, modules: list[Module], notes: list[str]) -> list[Served]:
        by_id: dict[tuple[str, BuildIdKind], list[BuildIdHit]] = defaultdict(list)
        for hit in self._index.find_build_ids(m.build_id for m in modules if m.build_id):
            if hit.package.nevra.arch in (self._arch, "noarch"):
                by_id[hit.build_id, hit.kind].append(hit)
        served = []
        for module in modules:
            if module.build_id is None or module.is_vdso:
                served.append(Served(module, None, None))
                continue
            binary = _choose(module.build_id, by_id[module.build_id, BuildIdKind.BINARY], notes)
            debug = _choose(module.build_id, by_id[module.build_id, BuildIdKind.DEBUG], notes)
            served.append(
                Served(
                    module,
                    binary.package if binary else None,
                    debug.package if debug else None,
                    "by build-id" if binary else "",
                    "by build-id" if debug else "",
                    debug.path if debug else None,
                )
            )
        self._links = {
            (hit.build_id, hit.package.id): hit.path
            for key, hits in by_id.items()
            if key[1] == BuildIdKind.BINARY_PATH
            for hit in hits
        }
        return served

    # -- 2. the binary of the debuginfo's build, by path -------------------------

    def _binary_by_path(self, served: Served) -> Served:
        debug = served.debug
        if served.binary is not None or debug is None or debug.source_nvr is None:
            return served
        paths = [served.module.name]
        link = self._links.get((served.module.build_id or "", debug.id))
        if link and not link.startswith("/usr/lib/.build-id/"):
            paths.insert(0, link)
        if served.debug_path:
            named = _binary_path_of(served.debug_path)
            if named:
                paths.append(named)
        for path in dict.fromkeys(paths):
            for package in self._index.build_of(debug.source_nvr, self._arch):
                if package.id == debug.id or package.nevra.name.endswith("-debuginfo"):
                    continue
                if path in self._installs(package):
                    how = f"as {path} of the debuginfo's build {debug.source_nvr}"
                    return replace(served, binary=package, binary_how=how)
        return served

    def _installs(self, package: Package) -> frozenset[str]:
        if package.id not in self._files:
            try:
                self._files[package.id] = frozenset(self._cache.header(package).files)
            except (PayloadError, OSError):
                self._files[package.id] = frozenset()
        return self._files[package.id]

    # -- 3. debug files by path ------------------------------------------------

    def _debug_by_path(self, served: Served) -> Served:
        binary = served.binary
        if served.debug is not None or binary is None:
            return served
        path = served.module.name
        nevra = binary.nevra
        candidates = [
            f"{DEBUG_DIR}{path}-{nevra.version}-{nevra.release}.{nevra.arch}.debug",
            f"{DEBUG_DIR}{path}.debug",
        ]
        for hit in self._index.find_paths(candidates, [BuildIdKind.DEBUG], self._arch):
            same_build = binary.source_nvr is not None and hit.package.source_nvr == (
                binary.source_nvr
            )
            if same_build and hit.build_id == served.module.build_id:
                return replace(served, debug=hit.package, debug_how="by path", debug_path=hit.path)
        return served

    # -- 4. the hint packages ----------------------------------------------------

    def _by_hints(self, result: Resolution) -> None:
        unplaced = {
            id(s.module) for s in result.served if s.binary is None and not s.module.is_vdso
        }
        if not unplaced or not self._hints:
            return
        wanted = {s.module.build_id: s.module for s in result.served if id(s.module) in unplaced}
        by_path = {s.module.name: s.module for s in result.served if id(s.module) in unplaced}
        found: dict[int, tuple[Package, Package | None, str]] = {}
        for package in self._hinted_packages():
            try:
                with self._cache.lease([package]):  # eviction leaves it alone meanwhile
                    files = self._cache.unpacked(package)[0]
                    for entry in files.entries:
                        installed = f"/{entry.path}"
                        data = files.find(installed)
                        if data is None:
                            continue
                        build_id = build_id_of(data)
                        module = wanted.pop(build_id, None) if build_id else None
                        how = f"in the hinted {package.nevra} by its build-id note"
                        if module is None and installed in by_path:
                            module = by_path[installed]
                            if module.build_id is not None and module.build_id != build_id:
                                continue
                            how = f"in the hinted {package.nevra} by its path"
                        if module is not None and id(module) not in found:
                            found[id(module)] = (package, self._debuginfo_of(package), how)
            except PayloadError as exc:
                result.notes.append(f"a hinted package could not be unpacked: {exc}")
        for index, served in enumerate(result.served):
            if id(served.module) in found:
                binary, debug, how = found[id(served.module)]
                result.served[index] = Served(
                    served.module,
                    binary,
                    served.debug or debug,
                    how,
                    served.debug_how or ("of the same build" if debug else ""),
                    served.debug_path,
                )

    def _hinted_packages(self) -> Iterable[Package]:
        for build in self._hints:
            release = os_release_of(build.release) or self._declared
            if release is None:
                continue
            named = [
                p
                for p in self._index.find_packages(build.name, release)
                if (p.nevra.version, p.nevra.release) == (build.version, build.release)
            ]
            of_build = self._index.build_of(str(build), self._arch)
            for package in {p.id: p for p in [*named, *of_build]}.values():
                if package.nevra.arch in (self._arch, "noarch") and not package.nevra.name.endswith(
                    ("-debuginfo", "-debugsource")
                ):
                    yield package

    def _debuginfo_of(self, package: Package) -> Package | None:
        nevra = package.nevra
        for candidate in self._index.find_packages(f"{nevra.name}-debuginfo", package.os_release):
            same = (candidate.nevra.version, candidate.nevra.release, candidate.nevra.arch)
            if same == (nevra.version, nevra.release, nevra.arch):
                return candidate
        return None

    # -- the release and its base packages -------------------------------------

    def _releases(self, result: Resolution) -> None:
        releases = Counter(s.binary.os_release for s in result.served if s.binary is not None)
        if not releases:
            return
        found = releases.most_common(1)[0][0]
        result.os_release = found
        if self._declared is not None and self._declared != found:
            result.notes.append(
                f"the crash declares {self._declared}, but the packages found by build-id "
                f"are built for {found}: {found} is used"
            )
        for name in BASE_PACKAGES:
            candidates = self._index.find_packages(
                name, found, self._arch
            ) or self._index.find_packages(name, found, "noarch")
            if candidates:
                result.extra.append(candidates[0])
            else:
                result.notes.append(f"no '{name}' package is mirrored for {found}")

    # -- shared DWARF --------------------------------------------------------------

    def find_shared_dwarf(self, result: Resolution) -> list[tuple[str, Package | None, str]]:
        """The packages holding the ``.dwz`` files the debug files point to.

        First decides which files of each debuginfo package the root takes
        (:meth:`narrow`) and unpacks those, side by side.  Adds the shared files'
        packages to ``result.extra`` and returns ``(name, package or None, how)``
        for the log.  Each debug file's ``.gnu_debugaltlink`` names the shared file
        (a relative path and its build-id); it is found by build-id, by its indexed
        path, or by the build its name spells.
        """
        self.narrow(result)
        # Every package of the root starts unpacking now, the debuginfo first: the root
        # is laid out from them next, and only the debug files are needed here.
        debug = {s.debug.id: s.debug for s in result.served if s.debug and s.debug_path}
        rest = [p for p in result.packages if p.id not in debug]
        pending = self._cache.prefetch([*debug.values(), *rest], result.only_by_digest())
        self.pending = list(pending.values())
        unpacked = {i: pending[p.sha256].result()[0] for i, p in debug.items()}
        report: list[tuple[str, Package | None, str]] = []
        have = {p.id for p in result.packages}
        seen: set[str] = set()
        for served in result.served:
            if served.debug is None or served.debug_path is None:
                continue
            debug_file = unpacked[served.debug.id].find(served.debug_path)
            if debug_file is None:
                continue
            try:
                link = open_elf(debug_file).altlink()
            except (NotElf, OSError):
                link = None
            if link is None or link.build_id in seen:
                continue
            seen.add(link.build_id)
            where = posixpath.normpath(
                posixpath.join(posixpath.dirname(served.debug_path), link.path)
            )
            package, how = self._dwz_package(link.build_id, where, result.os_release)
            name = f".dwz/{posixpath.basename(where)} [{link.build_id}]"
            report.append((name, package, how))
            if package is None:
                continue
            # The path dwz wrote is relative to the debug file's real name, which the
            # index may not have chosen (a hard-linked set): all of its holder's .dwz
            # files go in, with the one named.
            shared = {where} | {f for f in self._installs(package) if f.startswith(DWZ_DIR)}
            if package.id in result.only:
                result.only[package.id] |= shared
            elif package.id not in have:
                result.only[package.id] = frozenset(shared)
            if package.id not in have:
                have.add(package.id)
                result.extra.append(package)
        return report

    def narrow(self, result: Resolution) -> None:
        """Set ``result.only``: of each debuginfo package whose debug files the index
        names, the root takes those files, the gdb scripts beside them
        (``<file>-gdb.py``) and the package's shared DWARF (``.dwz/``); every other
        package it takes whole."""
        named: dict[int, set[str]] = defaultdict(set)
        whole = {p.id for p in result.extra}
        for served in result.served:
            if served.binary is not None:
                whole.add(served.binary.id)
            if served.debug is None:
                continue
            if served.debug_path is None:
                whole.add(served.debug.id)
            else:
                named[served.debug.id].add(served.debug_path)
        packages = {p.id: p for p in result.packages}
        for package_id, paths in named.items():
            if package_id in whole or package_id not in packages:
                continue
            files = self._installs(packages[package_id])
            scripts = tuple(f"{path}-gdb." for path in paths)
            result.only[package_id] = frozenset(
                paths | {f for f in files if f.startswith((*scripts, DWZ_DIR))}
            )

    def _dwz_package(
        self, build_id: str, path: str, os_release: str | None
    ) -> tuple[Package | None, str]:
        hits = [
            hit
            for hit in self._index.find_build_ids([build_id])
            if hit.kind in (BuildIdKind.DWZ, BuildIdKind.DEBUG)
        ]
        if hits:
            return min(hits, key=lambda h: h.package.id).package, "by its build-id"
        hits = self._index.find_paths([path], [BuildIdKind.DWZ], self._arch)
        if hits:
            return min(hits, key=lambda h: h.package.id).package, f"by its path {path}"
        build = _build_of(posixpath.basename(path))
        if build is None or os_release is None:
            return None, f"its name {posixpath.basename(path)} names no build"
        name, version, release, arch = build
        for package in self._index.find_packages(f"{name}-debuginfo", os_release, arch):
            if (package.nevra.version, package.nevra.release) == (version, release):
                return package, f"by its name, as the build {name}-{version}-{release}"
        return None, f"{name}-debuginfo-{version}-{release}.{arch} is not mirrored"

    # -- the crashed package's build ---------------------------------------------

    def build_is_mirrored(self, build: Build) -> bool:
        """Whether the mirror has ``build``, named by a package or by its build's name."""
        if self._index.build_of(str(build), self._arch):
            return True
        release = os_release_of(build.release) or self._declared
        if release is None:
            return False
        return any(
            (p.nevra.version, p.nevra.release) == (build.version, build.release)
            and p.nevra.arch in (self._arch, "noarch")
            for p in self._index.find_packages(build.name, release)
        )


def _binary_path_of(debug_path: str) -> str | None:
    """The binary a debug file is for, by its name.

    ``/usr/lib/debug/usr/lib64/libX.so.1-V-R.A.debug`` is for ``/usr/lib64/libX.so.1``.
    """
    if not debug_path.startswith(DEBUG_DIR + "/") or "/.build-id/" in debug_path:
        return None
    return _DEBUG_SUFFIX.sub("", debug_path.removeprefix(DEBUG_DIR)) or None


def _build_of(name: str) -> tuple[str, str, str, str] | None:
    nvr = parse_nvr(name)
    if nvr is None or nvr.arch is None:
        return None
    return nvr.name, nvr.version, nvr.release, nvr.arch
