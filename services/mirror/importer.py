"""``retrace-mirror import``: put local RPM files into the repository and the index."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.rpm import RpmError, os_release_of, read_header
from services.common.store import Package, Store
from services.mirror.repo import place, relative_path, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imported:
    """One imported file and whether it was new."""

    package: Package
    new: bool
    build_ids: int


def import_rpm(store: Store, repo: Path, path: Path, os_release: str | None = None) -> Imported:
    """Place one RPM in the repository and record it with its build-ids.

    The OS release comes from ``os_release`` or else the package's dist tag;
    with neither, :class:`RpmError` names the file.
    """
    header = read_header(path)
    if header.source:
        raise RpmError(f"{path.name} is a source RPM; only binary RPMs are mirrored")
    release = os_release or os_release_of(header.nevra.release)
    if release is None:
        raise RpmError(
            f"{path.name}: its release {header.nevra.release!r} has no dist tag such as "
            "'.fc40'; name the OS release with --release"
        )
    sha256 = sha256_of(path)
    relative = relative_path(release, header.nevra.arch, path.name)
    final = repo / relative
    if not final.exists() or sha256_of(final) != sha256:
        place(path, repo, relative)
    package, new = store.add_package(
        header.nevra, release, relative, sha256, path.stat().st_size, header.build_ids
    )
    log.info(
        "%s %s (%s) with %d build-ids",
        "imported" if new else "already had",
        package.nevra,
        release,
        len(header.build_ids),
    )
    return Imported(package, new, len(header.build_ids))
