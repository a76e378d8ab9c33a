"""Modules the index cannot place: the crash's ``package`` and ``packages`` files as hints.

The index knows a build-id only where a package ships a ``.build-id`` link.  A
binary without one, or without a build-id at all, is looked for inside the
packages the crash directory names: their files are read from the root cache,
and a module matches by its build-id note or, lacking one, by its path.  The
debuginfo package of the same build then serves it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.analyzer.coredump import Module
from services.analyzer.rootcache import RootCache
from services.analyzer.unpack import DIR
from services.common.rpm import os_release_of
from services.common.store import Package, Store

MAX_HINTS = 64
_NOTE_ID = re.compile(rb"\x04\x00\x00\x00(?P<size>[\x08-\x40])\x00\x00\x00\x03\x00\x00\x00GNU\x00")


@dataclass(frozen=True)
class Build:
    """A name, version and release a hint names."""

    name: str
    version: str
    release: str


def parse_hint(text: str) -> Build | None:
    """``NAME-[EPOCH:]VERSION-RELEASE[.ARCH]`` as a build, or ``None`` if it is not one."""
    text = text.strip()
    text = re.sub(r"\.(x86_64|aarch64|ppc64le|s390x|i686|noarch|armv7hl|riscv64)$", "", text)
    parts = text.rsplit("-", 2)
    if len(parts) != 3 or not all(parts):
        return None
    name, version, release = parts
    version = version.split(":", 1)[-1]
    return Build(name, version, release)


def read_hints(crash_dir: Path) -> list[Build]:
    """The builds named by the crash directory's ``package`` and ``packages`` files."""
    builds: list[Build] = []
    for name in ("package", "packages"):
        try:
            lines = (crash_dir / name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines[:MAX_HINTS]:
            build = parse_hint(line.split()[0] if line.split() else "")
            if build is not None and build not in builds:
                builds.append(build)
    return builds


def build_id_of(path: Path) -> str | None:
    """The GNU build-id note of an ELF file, read from its first pages."""
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return None
    if head[:4] != b"\x7fELF":
        return None
    match = _NOTE_ID.search(head)
    if match is None:
        return None
    start = match.end()
    return head[start : start + match["size"][0]].hex()


@dataclass(frozen=True)
class HintMatch:
    """A module found inside a hinted package."""

    module: Module
    binary: Package
    debug: Package | None
    how: str


def match_hints(
    store: Store, cache: RootCache, builds: list[Build], modules: list[Module], arch: str
) -> list[HintMatch]:
    """Find ``modules`` inside the hinted builds' binary packages."""
    matches: list[HintMatch] = []
    wanted = {m.build_id: m for m in modules if m.build_id}
    by_path = {m.name: m for m in modules if not m.build_id}
    for build in builds:
        os_release = os_release_of(build.release)
        if os_release is None:
            continue
        for package in store.find_packages(build.name, os_release):
            if (package.nevra.version, package.nevra.release) != (build.version, build.release):
                continue
            if package.nevra.arch not in (arch, "noarch"):
                continue
            with cache.lease([package]):  # eviction leaves it alone meanwhile
                files = cache.unpacked(package)[0]
                debug = _debuginfo_of(store, package, os_release)
                for entry in files.entries:
                    installed = f"/{entry.path}"
                    data = files.find(installed) if entry.kind != DIR else None
                    if data is None:
                        continue
                    found = build_id_of(data)
                    module = wanted.pop(found, None) if found else None
                    how = f"its build-id note in {installed}"
                    if module is None and installed in by_path:
                        module = by_path.pop(installed)
                        how = f"its path {installed} (it has no build-id)"
                    if module is not None:
                        matches.append(HintMatch(module, package, debug, how))
    return matches


def _debuginfo_of(store: Store, package: Package, os_release: str) -> Package | None:
    for candidate in store.find_packages(f"{package.nevra.name}-debuginfo", os_release):
        same = (candidate.nevra.version, candidate.nevra.release, candidate.nevra.arch)
        if same == (package.nevra.version, package.nevra.release, package.nevra.arch):
            return candidate
    return None
