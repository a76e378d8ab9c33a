"""What of deploy/ can be checked on a machine with no container engine or systemd running.

No container engine and no running systemd exist here: the container and compose
files cannot be started, so their commands are run directly instead; the units are
checked with systemd-analyze verify, which needs no running systemd.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"
BIN = Path(sys.executable).parent
PREFIX = "/usr/libexec/retrace-server/bin/"


def unit_files() -> list[Path]:
    return sorted((DEPLOY / "systemd").iterdir())


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """Verified with our console scripts where the RPM would put them."""
    for unit in unit_files():
        name = unit.name.replace("@.", "@1.")  # a template is verified as an instance
        (tmp_path / name).write_text(unit.read_text().replace(PREFIX, f"{BIN}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_unit_runs_a_command_of_ours_or_debuginfod() -> None:
    for unit in unit_files():
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                program = line.removeprefix("ExecStart=").split()[0]
                assert program.startswith(PREFIX) or program == "/usr/bin/debuginfod", unit


@pytest.fixture(scope="module")
def server_rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("spec")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    with tarfile.open(work / "retrace-server-0.1.0.tar.gz", "w:gz") as tar:
        for name in files:
            if (PROJECT / name).exists():
                tar.add(PROJECT / name, arcname=f"retrace-server-0.1.0/{name}")
    done = subprocess.run(
        [
            "rpmbuild", "-bb", "--nodeps",
            "--define", f"_topdir {work / 'top'}",
            "--define", f"_sourcedir {work}",
            # Fedora's /usr/bin/python3 has venv and pip; Debian's needs python3-venv.
            "--define", f"retrace_python {sys._base_executable}",  # type: ignore[attr-defined]
            str(DEPLOY / "retrace-server.spec"),
        ],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    [rpm] = (work / "top" / "RPMS").glob("*/retrace-server-0.1.0-1*.rpm")
    return rpm


def test_the_spec_builds_an_rpm_of_the_services_in_a_private_prefix(
    server_rpm: Path, tmp_path: Path
) -> None:
    listing = subprocess.run(
        ["rpm", "-qlp", str(server_rpm)], capture_output=True, text=True, check=True
    ).stdout.split()
    for command in ("retrace-intake", "retrace-analyzer", "retrace-mirror", "retrace-admin"):
        assert PREFIX + command in listing
    assert "/usr/bin/retrace-client" in listing
    assert "/etc/retrace-server/retrace.toml" in listing
    assert {f"/usr/lib/systemd/system/{u.name}" for u in unit_files()} <= set(listing)
    # The message schemas come as their own distribution, beside the server's.
    messages = r"/site-packages/retrace_server_messages-[^/]+\.dist-info/entry_points\.txt$"
    assert [f for f in listing if re.search(messages, f)]
    assert [f for f in listing if f.endswith("/site-packages/schemas/fedora.py")]
    # Nothing lands in the shared site-packages.
    assert not [f for f in listing if re.match(r"/usr/lib(64)?/python3[^/]*/site-packages/", f)]

    unpacked = tmp_path / "root"
    unpacked.mkdir()
    payload = subprocess.run(["rpm2cpio", str(server_rpm)], capture_output=True, check=True)
    subprocess.run(["cpio", "-idm", "--quiet"], input=payload.stdout, cwd=unpacked, check=True)
    script = (unpacked / PREFIX.lstrip("/") / "retrace-intake").read_text()
    assert script.startswith(f"#!{PREFIX}python")
    assert "BUILDROOT" not in script
