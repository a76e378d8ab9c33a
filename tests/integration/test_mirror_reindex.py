"""``retrace-mirror reindex`` on a repository indexed the old way, from header links alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from services.common.data import schema
from services.common.data.mirror import BuildIdKind
from services.common.rpm import header_entries, os_release_of
from services.common.rpmfile import read_header
from services.common.settings import MirrorConfig, load_settings
from services.mirror.repo import place, relative_path, sha256_of
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

OLD_HEAD = "0300"
PACKAGES = ("oddities", "oddities-debuginfo", "crasher", "crasher-debuginfo")


def index_the_old_way(store: Data, repo: Path, rpms: list[Path]) -> None:
    """What the importer before legacy migration 0400 left: rows of the old schema, links only."""
    with store.engine.begin() as conn:
        schema.LEGACY.upgrade(conn, OLD_HEAD)
    with store.engine.begin() as conn:
        for path in rpms:
            header = read_header(path)
            release = os_release_of(header.release)
            assert release is not None
            relative = relative_path(release, header.arch, path.name)
            place(path, repo, relative)
            package_id = conn.execute(
                sa.text(
                    "INSERT INTO packages (name, epoch, version, release, arch, os_release, "
                    "path, sha256, size, added_at) VALUES (:n, :e, :v, :r, :a, :o, :p, :s, "
                    ":z, CURRENT_TIMESTAMP) RETURNING id"
                ),
                {
                    "n": header.name,
                    "e": header.epoch,
                    "v": header.version,
                    "r": header.release,
                    "a": header.arch,
                    "o": release,
                    "p": relative,
                    "s": sha256_of(path),
                    "z": path.stat().st_size,
                },
            ).scalar_one()
            for entry in header_entries(header):
                if entry.kind in (BuildIdKind.BINARY, BuildIdKind.DEBUG):  # all it knew
                    conn.execute(
                        sa.text(
                            "INSERT INTO build_ids (build_id, package_id, kind, path) "
                            "VALUES (:b, :p, :k, :f)"
                        ),
                        {"b": entry.build_id, "p": package_id, "k": entry.kind, "f": entry.path},
                    )


def test_reindex_reads_the_elf_files_of_an_old_index_resumably_and_idempotently(
    tmp_path: Path, crash_fixtures: Fixtures
) -> None:
    home = Stack(tmp_path / "home", "amqp://guest:guest@127.0.0.1:5672/")
    home.write_settings()
    settings = load_settings(MirrorConfig, home.env)
    store = Data.from_url(settings.store_url)
    rpms = [crash_fixtures.rpm(name).path for name in PACKAGES]
    index_the_old_way(store, settings.repo, rpms)
    migrated = home.command("retrace-admin", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    odd = next(c for c in crash_fixtures.extra_crashes if c.name == "assert-abort")
    odd_id = build_id_in(odd.problem_dir / "coredump", odd.executable)
    # The old index cannot place the oddities: their package has no .build-id links.
    assert store.mirror.find_build_ids([odd_id]) == []
    assert store.mirror.reindex_backlog() == len(PACKAGES)

    # A package whose file is missing is left for the next run; the others are done.
    oddities = store.mirror.find_packages("oddities", "fedora-40")[0]
    kept = tmp_path / "kept.rpm"
    (settings.repo / oddities.path).rename(kept)
    first = home.command("retrace-mirror", "reindex")
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"[1/{len(PACKAGES)}] " in first.stdout
    assert f"re-indexed {len(PACKAGES) - 1} packages; 1 left" in first.stdout
    assert "oddities-1.0-1.fc40.x86_64: not re-indexed" in first.stderr

    kept.rename(settings.repo / oddities.path)
    second = home.command("retrace-mirror", "reindex")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[1/1] oddities-1.0-1.fc40.x86_64" in second.stdout
    assert "re-indexed 1 packages; 0 left" in second.stdout

    hits = {(h.kind, h.package.nevra.name, h.path) for h in store.mirror.find_build_ids([odd_id])}
    assert hits == {
        (BuildIdKind.BINARY, "oddities", odd.executable),
        (
            BuildIdKind.DEBUG,
            "oddities-debuginfo",
            f"/usr/lib/debug{odd.executable}-1.0-1.fc40.x86_64.debug",
        ),
    }
    builds = {p.nevra.name: p.source_nvr for p in store.mirror.all_packages()}
    assert builds == dict.fromkeys(PACKAGES[:2], "oddities-1.0-1.fc40") | dict.fromkeys(
        PACKAGES[2:], "crasher-1.0-1.fc40"
    )

    again = home.command("retrace-mirror", "reindex")
    assert again.returncode == 0
    assert "re-indexed 0 packages; 0 left" in again.stdout


def build_id_in(core: Path, executable: str) -> str:
    """The build-id the core records for ``executable`` (eu-unstrip, as the analyzer reads it)."""
    import subprocess

    out = subprocess.run(
        ["eu-unstrip", "-n", f"--core={core}"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if (fields and fields[-1] == executable) or (len(fields) > 2 and fields[2] == executable):
            return fields[1].split("@")[0]
    raise AssertionError(f"{executable} not in the core:\n{out}")
