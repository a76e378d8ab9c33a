"""``retrace-mirror import`` and the schema check, run as the real console scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.common.data.mirror import BuildIdKind
from services.common.settings import MirrorConfig, load_settings
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture
def home(tmp_path: Path) -> Stack:
    stack = Stack(tmp_path / "home", "amqp://guest:guest@127.0.0.1:5672/")
    stack.write_settings()
    done = stack.command("retrace-admin", "migrate")
    assert done.returncode == 0, done.stderr
    return stack


def store_of(stack: Stack) -> Data:
    return Data.from_url(load_settings(MirrorConfig, stack.env).store_url)


def test_import_places_packages_by_release_and_arch_and_indexes_build_ids(
    home: Stack, crash_fixtures: Fixtures
) -> None:
    crasher = crash_fixtures.rpm("crasher")
    debuginfo = crash_fixtures.rpm("crasher-debuginfo")
    done = home.command("retrace-mirror", "import", str(crasher.path), str(debuginfo.path))
    assert done.returncode == 0, done.stderr
    assert "imported: crasher-1.0-1.fc40.x86_64 (fedora-40, 2 build-ids)" in done.stdout
    repo = home.home / "var/repo/fedora-40/x86_64/Packages"
    assert (repo / crasher.filename).read_bytes() == crasher.path.read_bytes()

    exe = next(m for m in crash_fixtures.crash.modules if m.path == "/usr/bin/crasher")
    hits = store_of(home).mirror.find_build_ids([exe.build_id])
    by_kind = {h.kind: h for h in hits}
    assert sorted(by_kind) == [BuildIdKind.BINARY, BuildIdKind.DEBUG]
    assert by_kind[BuildIdKind.BINARY].package.nevra.name == "crasher"
    assert by_kind[BuildIdKind.BINARY].path == "/usr/bin/crasher"
    assert by_kind[BuildIdKind.DEBUG].package.nevra.name == "crasher-debuginfo"
    assert by_kind[BuildIdKind.DEBUG].path.startswith("/usr/lib/debug/usr/bin/crasher")

    again = home.command("retrace-mirror", "import", str(crasher.path))
    assert again.returncode == 0, again.stderr
    assert "already mirrored: crasher-1.0-1.fc40.x86_64" in again.stdout
    assert len(store_of(home).mirror.find_packages("crasher", "fedora-40")) == 1


@pytest.fixture(scope="module")
def rpm_without_dist_tag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("rpmbuild")
    subprocess.run(
        [
            "rpmbuild", "-bb", "--nodeps", "--quiet",
            "--define", f"_topdir {top}", "--define", "dist %{nil}",
            str(FIXTURES / "filesystem" / "filesystem.spec"),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    [rpm] = (top / "RPMS").glob("*/*.rpm")
    return rpm


def test_import_without_a_dist_tag_refuses_naming_the_file(
    home: Stack, rpm_without_dist_tag: Path
) -> None:
    done = home.command("retrace-mirror", "import", str(rpm_without_dist_tag))
    assert done.returncode == 1
    assert rpm_without_dist_tag.name in done.stderr
    assert "--release" in done.stderr
    assert not (home.home / "var/repo").exists() or not any((home.home / "var/repo").rglob("*.rpm"))

    named = home.command(
        "retrace-mirror", "import", "--release", "fedora-41", str(rpm_without_dist_tag)
    )
    assert named.returncode == 0, named.stderr
    assert (home.home / "var/repo/fedora-41/x86_64/Packages" / rpm_without_dist_tag.name).exists()


def test_a_file_that_is_not_an_rpm_is_refused_by_name(home: Stack, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.rpm"
    bogus.write_bytes(b"not an rpm")
    done = home.command("retrace-mirror", "import", str(bogus))
    assert done.returncode == 1
    assert "bogus.rpm" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [("retrace-analyzer", "run"), ("retrace-intake", "serve"), ("retrace-mirror", "import", "x")],
)
def test_services_refuse_to_start_on_an_unmigrated_database(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    stack = Stack(tmp_path / "fresh", "amqp://guest:guest@127.0.0.1:5672/")
    stack.write_settings()
    done = stack.command(*argv)
    assert done.returncode == 2
    service = argv[0].removeprefix("retrace-")
    # Its own branch is named, with the command that brings just that one up.
    assert f"run 'retrace-admin migrate --service {service}'" in done.stderr


def test_another_file_under_a_mirrored_nevra_is_refused_and_the_repo_keeps_the_indexed_one(
    home: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crasher = crash_fixtures.rpm("crasher")
    done = home.command("retrace-mirror", "import", str(crasher.path))
    assert done.returncode == 0, done.stderr
    # The same package with one byte of its signature header changed: still a readable
    # RPM of the same NEVRA, but another file.
    other = tmp_path / crasher.filename
    data = bytearray(crasher.path.read_bytes())
    index_count = int.from_bytes(data[96 + 8 : 96 + 12], "big")
    data[96 + 16 + 16 * index_count] ^= 0xFF
    other.write_bytes(bytes(data))
    refused = home.command("retrace-mirror", "import", str(other))
    assert refused.returncode == 1
    assert "already mirrored with a different content" in refused.stderr
    placed = home.home / "var/repo/fedora-40/x86_64/Packages" / crasher.filename
    assert placed.read_bytes() == crasher.path.read_bytes()
