"""The mirror's data: the package and build-id index, Koji builds and cursors.

Only this module names these tables.  The analyzer reads the index through
:class:`MirrorData` (:meth:`~MirrorData.find_build_ids`, :meth:`~MirrorData.find_paths`,
:meth:`~MirrorData.build_of`, :meth:`~MirrorData.find_packages`), the intake asks it
which releases are mirrored and whether a build is (:meth:`~MirrorData.mirrored_releases`,
:meth:`~MirrorData.holds_build`); neither writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.data.db import Database, utcnow

metadata = sa.MetaData()

packages = sa.Table(
    "packages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("release", sa.Text, nullable=False),
    sa.Column("arch", sa.String(32), nullable=False),
    sa.Column("os_release", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    # The build the package came from: its source RPM's NVR.
    sa.Column("source_nvr", sa.Text),
    # How its build-ids were read: see INDEX_VERSION.
    sa.Column("index_version", sa.Integer, nullable=False, server_default="0"),
    # How many of its header's .build-id links its ELF files contradicted.
    sa.Column("index_conflicts", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("os_release", "name", "epoch", "version", "release", "arch"),
)

INDEX_VERSION = 1
"""Packages whose ``index_version`` is lower were indexed from their header's
``.build-id`` links alone; ``retrace-mirror reindex`` reads their ELF files."""

build_ids = sa.Table(
    "build_ids",
    metadata,
    sa.Column("build_id", sa.String(128), nullable=False),
    sa.Column(
        "package_id", sa.Integer, sa.ForeignKey("packages.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    # Where the entry was read: "elf" (the file's own note) or "header" (a .build-id link).
    sa.Column("source", sa.String(8), nullable=False, server_default="header"),
    sa.PrimaryKeyConstraint("build_id", "package_id", "path"),
)

# Which Koji build brought which packages, and how far the catch-up with Koji has come.
koji_builds = sa.Table(
    "koji_builds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("nvr", sa.Text, nullable=False),
    sa.Column("os_release", sa.String(64)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
)

koji_build_packages = sa.Table(
    "koji_build_packages",
    metadata,
    sa.Column(
        "build_id", sa.Integer, sa.ForeignKey("koji_builds.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "package_id", sa.Integer, sa.ForeignKey("packages.id", ondelete="CASCADE"), nullable=False
    ),
    sa.PrimaryKeyConstraint("build_id", "package_id"),
)

mirror_cursors = sa.Table(
    "mirror_cursors",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.DateTime(timezone=True), nullable=False),
)


class BuildIdKind(StrEnum):
    """What file of a package a build-id entry names."""

    BINARY = "binary"
    """The program or library itself."""
    DEBUG = "debug"
    """Its separate debug file."""
    DWZ = "dwz"
    """Shared DWARF under ``/usr/lib/debug/.dwz/`` that debug files point to."""
    BINARY_PATH = "binary-path"
    """Not a file of this package: a debuginfo package's ``.build-id`` link naming
    where the binary of that build-id is installed (by another package of the build)."""


class IndexSource(StrEnum):
    """Where a build-id entry was read."""

    ELF = "elf"
    HEADER = "header"


@dataclass(frozen=True)
class IndexEntry:
    """One build-id entry of a package, as the mirror indexes it."""

    build_id: str
    kind: BuildIdKind
    path: str
    source: IndexSource = IndexSource.HEADER


class SyncState(StrEnum):
    """What the mirror did with a Koji build (``koji_builds.state``)."""

    MIRRORED = "mirrored"
    """Every wanted package of it is in the repository and the index."""
    REMOVED = "removed"
    """Deleted in Koji, and removed here (``delete_on_deleted``)."""
    SKIPPED = "skipped"
    """Not mirrored on purpose: the settings do not want it, or there was nothing to do."""
    FAILED = "failed"
    """Given up on: its command was dead-lettered, with the reason."""


class PackageConflict(ValueError):
    """A different file is already recorded under the same NEVRA and release."""


@dataclass(frozen=True)
class Nevra:
    """Name, epoch, version, release and architecture of one RPM."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str

    def __str__(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch else ""
        return f"{self.name}-{epoch}{self.version}-{self.release}.{self.arch}"


@dataclass(frozen=True)
class Package:
    """One mirrored RPM."""

    id: int
    nevra: Nevra
    os_release: str
    path: str
    sha256: str
    size: int
    source_nvr: str | None = None
    """The build it came from (its source RPM's NVR), when the index knows it."""


@dataclass(frozen=True)
class BuildIdHit:
    """A package file that carries a build-id."""

    build_id: str
    kind: BuildIdKind
    path: str
    package: Package


@dataclass(frozen=True)
class KojiBuild:
    """One row of ``koji_builds``: what the mirror did with a Koji build."""

    id: int
    nvr: str
    os_release: str | None
    state: SyncState
    reason: str | None
    completed_at: datetime | None
    synced_at: datetime


@dataclass(frozen=True)
class MirrorCounts:
    """What the mirror's ``/metrics`` reports of its index and Koji builds."""

    packages: int
    package_bytes: int
    builds: dict[str, int]
    """Koji builds per :class:`SyncState`."""
    last_sync: datetime | None
    index_conflicts: int
    reindex_backlog: int


class MirrorData:
    """The mirror's tables; every method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def counts(self) -> MirrorCounts:
        """Sizes of the index and of the Koji builds seen, for ``/metrics``."""
        with self.db.connect() as conn:
            count, size = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(packages.c.size), 0))
            ).one()
            states = conn.execute(
                sa.select(koji_builds.c.state, sa.func.count()).group_by(koji_builds.c.state)
            ).all()
            last = conn.execute(sa.select(sa.func.max(koji_builds.c.synced_at))).scalar()
        return MirrorCounts(
            packages=int(count),
            package_bytes=int(size),
            builds={str(state): int(n) for state, n in states},
            last_sync=last,
            index_conflicts=self.index_conflicts(),
            reindex_backlog=self.reindex_backlog(),
        )

    # -- packages and build-ids -----------------------------------------------

    def add_package(
        self,
        nevra: Nevra,
        os_release: str,
        path: str,
        sha256: str,
        size: int,
        entries: Sequence[IndexEntry],
        source_nvr: str | None = None,
        index_version: int = INDEX_VERSION,
        conflicts: int = 0,
    ) -> tuple[Package, bool]:
        """Record a package, the build it came from and its build-id entries.

        Idempotent: importing the same package again returns the existing row and
        ``False``; a different file under the same NEVRA and release is refused
        (:class:`PackageConflict`).
        """
        key = (
            packages.c.os_release == os_release,
            packages.c.name == nevra.name,
            packages.c.epoch == nevra.epoch,
            packages.c.version == nevra.version,
            packages.c.release == nevra.release,
            packages.c.arch == nevra.arch,
        )
        with self.db.begin() as conn:
            row = conn.execute(packages.select().where(*key)).mappings().first()
            if row is not None:
                if row["sha256"] != sha256:
                    raise PackageConflict(
                        f"{nevra} for {os_release} is already mirrored with a different "
                        f"content (sha256 {row['sha256']}, this file {sha256})"
                    )
                return _package(row), False
            inserted = conn.execute(
                packages.insert().values(
                    name=nevra.name,
                    epoch=nevra.epoch,
                    version=nevra.version,
                    release=nevra.release,
                    arch=nevra.arch,
                    os_release=os_release,
                    path=path,
                    sha256=sha256,
                    size=size,
                    added_at=utcnow(),
                    source_nvr=source_nvr,
                    index_version=index_version,
                    index_conflicts=conflicts,
                )
            ).inserted_primary_key
            assert inserted is not None
            package_id = inserted[0]
            _insert_entries(conn, package_id, entries)
            added = conn.execute(packages.select().where(packages.c.id == package_id))
            return _package(added.mappings().one()), True

    def bulk_load(
        self, package_rows: Sequence[dict[str, Any]], entry_rows: Sequence[dict[str, Any]]
    ) -> None:
        """Fill the index with rows of ``packages`` and ``build_ids`` (column → value), in
        one transaction and without any check: for benchmarks of a large index only."""
        batch = 50_000
        with self.db.begin() as conn:
            if package_rows:
                conn.execute(packages.insert(), list(package_rows))
            for start in range(0, len(entry_rows), batch):
                conn.execute(build_ids.insert(), list(entry_rows[start : start + batch]))

    def reindex_package(
        self,
        package_id: int,
        entries: Sequence[IndexEntry],
        source_nvr: str | None,
        index_version: int = INDEX_VERSION,
        conflicts: int = 0,
    ) -> bool:
        """Replace a package's build-id entries and record its build; ``False`` if it is gone.

        One transaction: a reader sees the old entries or the new ones, never a mix.
        """
        with self.db.begin() as conn:
            done = conn.execute(
                packages.update()
                .where(packages.c.id == package_id)
                .values(
                    source_nvr=source_nvr, index_version=index_version, index_conflicts=conflicts
                )
            )
            if done.rowcount == 0:
                return False
            conn.execute(build_ids.delete().where(build_ids.c.package_id == package_id))
            _insert_entries(conn, package_id, entries)
            return True

    def index_conflicts(self) -> int:
        """How many ``.build-id`` links of mirrored packages their ELF files contradicted."""
        with self.db.connect() as conn:
            total = conn.execute(sa.select(sa.func.sum(packages.c.index_conflicts))).scalar()
        return int(total or 0)

    def reindex_backlog(self, index_version: int = INDEX_VERSION) -> int:
        """How many packages were indexed by an older way than ``index_version``."""
        query = sa.select(sa.func.count()).where(packages.c.index_version < index_version)
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def packages_to_reindex(self, index_version: int = INDEX_VERSION) -> list[Package]:
        """Packages indexed by an older way than ``index_version``, oldest import first."""
        query = (
            packages.select()
            .where(packages.c.index_version < index_version)
            .order_by(packages.c.id)
        )
        with self.db.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def find_paths(
        self, paths: Iterable[str], kinds: Iterable[BuildIdKind] = (), arch: str | None = None
    ) -> list[BuildIdHit]:
        """Every indexed file at one of ``paths`` (of one of ``kinds``, in ``arch``)."""
        wanted = sorted(set(paths))
        if not wanted:
            return []
        query = (
            sa.select(
                packages,
                build_ids.c.build_id,
                build_ids.c.kind,
                build_ids.c.path.label("entry_path"),
            )
            .join(packages, packages.c.id == build_ids.c.package_id)
            .where(build_ids.c.path.in_(wanted))
            .order_by(packages.c.id)
        )
        kinds = list(kinds)
        if kinds:
            query = query.where(build_ids.c.kind.in_([str(k) for k in kinds]))
        if arch is not None:
            query = query.where(packages.c.arch.in_([arch, "noarch"]))
        with self.db.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_hit(row) for row in rows]

    def build_of(self, source_nvr: str, arch: str) -> list[Package]:
        """The packages of build ``source_nvr`` for ``arch`` (and noarch), oldest import first."""
        query = (
            packages.select()
            .where(packages.c.source_nvr == source_nvr, packages.c.arch.in_([arch, "noarch"]))
            .order_by(packages.c.id)
        )
        with self.db.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def find_build_ids(self, wanted: Iterable[str]) -> list[BuildIdHit]:
        """Every package file that carries one of the ``wanted`` build-ids."""
        ids = sorted(set(wanted))
        if not ids:
            return []
        query = (
            sa.select(
                packages,
                build_ids.c.build_id,
                build_ids.c.kind,
                build_ids.c.path.label("entry_path"),
            )
            .join(packages, packages.c.id == build_ids.c.package_id)
            .where(build_ids.c.build_id.in_(ids))
            .order_by(build_ids.c.build_id, packages.c.id)
        )
        with self.db.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_hit(row) for row in rows]

    def mirrored_releases(self) -> list[tuple[str, str]]:
        """Every ``(os_release, arch)`` the mirror has binary packages for, such as
        ``("fedora-40", "x86_64")`` (noarch and source packages name no architecture)."""
        query = (
            sa.select(packages.c.os_release, packages.c.arch)
            .where(packages.c.arch.not_in(["noarch", "src"]))
            .distinct()
            .order_by(packages.c.os_release, packages.c.arch)
        )
        with self.db.connect() as conn:
            return [(release, arch) for release, arch in conn.execute(query)]

    def holds_build(
        self,
        name: str,
        version: str,
        release: str,
        arches: Iterable[str] | None = None,
        os_releases: Iterable[str] | None = None,
    ) -> bool:
        """Whether the mirror holds ``name-version-release`` for one of ``arches`` in one
        of ``os_releases`` (``None``: any).

        The NVR may name a package (a subpackage such as ``foo-cli``) or the build it
        comes from: a package whose source RPM is ``name-version-release`` counts.
        """
        nvr = f"{name}-{version}-{release}"
        query = sa.select(packages.c.id).where(
            sa.or_(
                sa.and_(
                    packages.c.name == name,
                    packages.c.version == version,
                    packages.c.release == release,
                ),
                packages.c.source_nvr == nvr,
            )
        )
        if arches is not None:
            query = query.where(packages.c.arch.in_(sorted(set(arches))))
        if os_releases is not None:
            query = query.where(packages.c.os_release.in_(sorted(set(os_releases))))
        with self.db.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def find_packages(self, name: str, os_release: str, arch: str | None = None) -> list[Package]:
        """Every mirrored version of ``name`` for ``os_release``, newest import first."""
        query = packages.select().where(
            packages.c.name == name, packages.c.os_release == os_release
        )
        if arch is not None:
            query = query.where(packages.c.arch == arch)
        with self.db.connect() as conn:
            rows = conn.execute(query.order_by(packages.c.id.desc())).mappings().all()
        return [_package(row) for row in rows]

    def find_package(self, nevra: Nevra, os_release: str) -> Package | None:
        """The mirrored package ``nevra`` for ``os_release``, if any."""
        query = packages.select().where(
            packages.c.os_release == os_release,
            packages.c.name == nevra.name,
            packages.c.epoch == nevra.epoch,
            packages.c.version == nevra.version,
            packages.c.release == nevra.release,
            packages.c.arch == nevra.arch,
        )
        with self.db.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _package(row)

    def remove_package(self, package_id: int) -> None:
        """Forget a package with its build-id entries (its file is the caller's)."""
        with self.db.begin() as conn:
            conn.execute(build_ids.delete().where(build_ids.c.package_id == package_id))
            conn.execute(
                koji_build_packages.delete().where(koji_build_packages.c.package_id == package_id)
            )
            conn.execute(packages.delete().where(packages.c.id == package_id))

    def all_packages(self, os_release: str | None = None) -> list[Package]:
        """Every mirrored package (of ``os_release``), oldest import first."""
        query = packages.select().order_by(packages.c.id)
        if os_release is not None:
            query = query.where(packages.c.os_release == os_release)
        with self.db.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    # -- Koji builds (the mirror) ---------------------------------------------

    def record_build(
        self,
        build_id: int,
        nvr: str,
        os_release: str | None,
        state: SyncState,
        reason: str | None = None,
        completed_at: datetime | None = None,
        package_ids: Iterable[int] = (),
    ) -> None:
        """Record what the mirror did with Koji build ``build_id``; safe to repeat."""
        values = {
            "nvr": nvr,
            "os_release": os_release,
            "state": state,
            "reason": reason,
            "completed_at": completed_at,
            "synced_at": utcnow(),
        }
        with self.db.begin() as conn:
            done = conn.execute(
                koji_builds.update().where(koji_builds.c.id == build_id).values(**values)
            )
            if done.rowcount == 0:
                conn.execute(koji_builds.insert().values(id=build_id, **values))
            have = set(
                conn.execute(
                    sa.select(koji_build_packages.c.package_id).where(
                        koji_build_packages.c.build_id == build_id
                    )
                ).scalars()
            )
            new = sorted(set(package_ids) - have)
            if new:
                conn.execute(
                    koji_build_packages.insert(),
                    [{"build_id": build_id, "package_id": p} for p in new],
                )

    def get_build(self, build_id: int) -> KojiBuild | None:
        """What the mirror did with Koji build ``build_id``, if it ever saw it."""
        return self._one_build(koji_builds.c.id == build_id)

    def find_build(self, nvr: str) -> KojiBuild | None:
        """What the mirror did with the Koji build named ``nvr``, if it ever saw it."""
        return self._one_build(koji_builds.c.nvr == nvr)

    def _one_build(self, where: sa.ColumnElement[bool]) -> KojiBuild | None:
        with self.db.connect() as conn:
            row = conn.execute(koji_builds.select().where(where)).mappings().first()
        return None if row is None else KojiBuild(**{**row, "state": SyncState(row["state"])})

    def build_packages(self, build_id: int) -> list[Package]:
        """The mirrored packages that Koji build ``build_id`` brought."""
        query = (
            packages.select()
            .join(koji_build_packages, koji_build_packages.c.package_id == packages.c.id)
            .where(koji_build_packages.c.build_id == build_id)
            .order_by(packages.c.id)
        )
        with self.db.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def get_cursor(self, name: str) -> datetime | None:
        """The saved position ``name`` (e.g. the last Koji completion time seen)."""
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(mirror_cursors.c.value).where(mirror_cursors.c.name == name)
            ).scalar()
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # SQLite forgets the zone; we store UTC
        return value

    def set_cursor(self, name: str, value: datetime) -> None:
        """Save the position ``name``."""
        with self.db.begin() as conn:
            done = conn.execute(
                mirror_cursors.update().where(mirror_cursors.c.name == name).values(value=value)
            )
            if done.rowcount == 0:
                conn.execute(mirror_cursors.insert().values(name=name, value=value))


def _hit(row: Any) -> BuildIdHit:
    return BuildIdHit(
        build_id=row["build_id"],
        kind=BuildIdKind(row["kind"]),
        path=row["entry_path"],
        package=_package(row),
    )


def _insert_entries(conn: Connection, package_id: int, entries: Sequence[IndexEntry]) -> None:
    # One row per (build-id, path): an ELF note and a header link may both name a file.
    unique: dict[tuple[str, str], IndexEntry] = {}
    for entry in entries:
        if entry.source == IndexSource.ELF or (entry.build_id, entry.path) not in unique:
            unique[entry.build_id, entry.path] = entry
    if unique:
        conn.execute(
            build_ids.insert(),
            [
                {
                    "build_id": e.build_id,
                    "package_id": package_id,
                    "kind": str(e.kind),
                    "path": e.path,
                    "source": str(e.source),
                }
                for _, e in sorted(unique.items())
            ],
        )


def _package(row: Any) -> Package:
    return Package(
        id=row["id"],
        nevra=Nevra(row["name"], row["epoch"], row["version"], row["release"], row["arch"]),
        os_release=row["os_release"],
        path=row["path"],
        sha256=row["sha256"],
        size=row["size"],
        source_nvr=row["source_nvr"],
    )
