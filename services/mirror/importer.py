"""``retrace-mirror import`` and ``reindex``: RPM files into the repository and the index."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.data.mirror import MirrorData, Nevra, Package, PackageConflict
from services.common.rpm import RpmError, os_release_of
from services.mirror.index import RpmIndex, index_rpm
from services.mirror.repo import place, relative_path, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imported:
    """One imported file and whether it was new."""

    package: Package
    new: bool
    build_ids: int


def import_rpm(data: MirrorData, repo: Path, path: Path, os_release: str | None = None) -> Imported:
    """Place one RPM in the repository and record it with its build-ids.

    The OS release comes from ``os_release`` or else the package's dist tag;
    with neither, :class:`RpmError` names the file.
    """
    index = _read(path, None)
    header, sha256 = index.header, index.sha256
    if header.source_rpm is None:
        raise RpmError(f"{path.name} is a source RPM; only binary RPMs are mirrored")
    release = os_release or os_release_of(header.release)
    if release is None:
        raise RpmError(
            f"{path.name}: its release {header.release!r} has no dist tag such as "
            "'.fc40'; name the OS release with --release"
        )
    nevra = Nevra(header.name, header.epoch, header.version, header.release, header.arch)
    known = data.find_package(nevra, release)
    if known is not None and known.sha256 != sha256:
        # Refused before the repository is touched: the file there stays the indexed one.
        raise PackageConflict(
            f"{nevra} for {release} is already mirrored with a different content "
            f"(sha256 {known.sha256}, this file {sha256})"
        )
    relative = relative_path(release, header.arch, path.name)
    final = repo / relative
    if not final.exists() or sha256_of(final) != sha256:
        place(path, repo, relative)
    package, new = data.add_package(
        nevra,
        release,
        relative,
        sha256,
        path.stat().st_size,
        index.entries,
        source_nvr=header.source_nvr,
        conflicts=len(index.conflicts),
    )
    log.info(
        "%s %s (%s, build %s) with %d build-ids",
        "imported" if new else "already had",
        package.nevra,
        release,
        header.source_nvr,
        len(index.entries),
    )
    return Imported(package, new, len(index.entries))


def _read(path: Path, sha256: str | None) -> RpmIndex:
    try:
        index = index_rpm(path, sha256)
    except ValueError as exc:
        raise RpmError(f"{path.name} is not a readable RPM: {exc}") from exc
    for warning in index.warnings:
        log.warning("%s", warning)
    for conflict in index.conflicts:
        log.warning("%s", conflict)
    return index


def reindex(data: MirrorData, repo: Path, report: Callable[[int, int, Package], None]) -> int:
    """Read the ELF files of every package indexed the old way; return how many were done.

    Idempotent and resumable: each package is re-indexed in one transaction that
    marks it done, so an interrupted run goes on where it stopped; a package whose
    file is missing or unreadable is logged and left for the next run.
    """
    todo = data.packages_to_reindex()
    done = 0
    for number, package in enumerate(todo, 1):
        report(number, len(todo), package)
        try:
            index = _read(repo / package.path, package.sha256)
        except (RpmError, OSError) as exc:
            log.error("%s: not re-indexed: %s", package.nevra, exc)
            continue
        if data.reindex_package(
            package.id,
            index.entries,
            index.header.source_nvr,
            conflicts=len(index.conflicts),
        ):
            done += 1
    return done
