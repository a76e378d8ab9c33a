"""``retrace-mirror prune``: the retention policy (by default, keep everything).

Two optional rules from the settings: drop whole releases past their end of life
(``mirror.eol_releases``), and cap the repository's size (``mirror.max_size_gib``)
by dropping the oldest imports first.  Files, index rows and metadata go together.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.common.data.mirror import MirrorData, Package
from services.common.settings import MirrorSettings
from services.mirror.repo import relative_path, update_metadata

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class Pruned:
    """What a prune removed."""

    packages: int
    bytes: int
    releases: tuple[str, ...]


def prune(data: MirrorData, repo: Path, settings: MirrorSettings) -> Pruned:
    """Apply the retention settings to the repository and the index."""
    removed = 0
    freed = 0
    for release in settings.eol_releases:
        for package in data.all_packages(release):
            data.remove_package(package.id)
            removed += 1
            freed += package.size
        shutil.rmtree(repo / release, ignore_errors=True)
        log.info("dropped end-of-life release %s", release)
    if settings.max_size_gib:
        cap = int(settings.max_size_gib * GIB)
        everything = data.all_packages()
        total = sum(p.size for p in everything)
        touched: set[tuple[str, str]] = set()
        for package in everything:  # oldest import first
            if total <= cap:
                break
            touched |= _remove(data, repo, settings, package)
            total -= package.size
            removed += 1
            freed += package.size
        for release, arch in sorted(touched):
            update_metadata(repo / release / arch, settings.createrepo_workers)
    log.info("pruned %d packages, %d bytes", removed, freed)
    return Pruned(removed, freed, tuple(settings.eol_releases))


def _remove(
    data: MirrorData, repo: Path, settings: MirrorSettings, package: Package
) -> set[tuple[str, str]]:
    release, arch = package.os_release, package.nevra.arch
    filename = Path(package.path).name
    arches = settings.arches if arch == "noarch" else (arch,)
    for each in arches:
        (repo / relative_path(release, each, filename)).unlink(missing_ok=True)
    (repo / package.path).unlink(missing_ok=True)
    data.remove_package(package.id)
    return {(release, each) for each in arches}
