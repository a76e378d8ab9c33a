"""Serving the mirror: dnf over our HTTP face, and elfutils' debuginfod over the repo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.runner import run
from tests.fixtures.build import Fixtures, unpack_rpm
from tests.integration.stack import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, crash_fixtures: Fixtures) -> Path:
    """A mirror home with the fixture RPMs imported (the fetcher's own path is tested apart)."""
    home = tmp_path_factory.mktemp("serving")
    (home / "retrace.toml").write_text("")
    env = {**os.environ, "RETRACE_CONFIG": str(home / "retrace.toml")}
    subprocess.run([BIN / "retrace-admin", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run(
        [BIN / "retrace-mirror", "import", *(str(r.path) for r in crash_fixtures.rpms)],
        env=env,
        check=True,
        capture_output=True,
    )
    return home


def scanned_rpms(url: str) -> int:
    """How many RPMs debuginfod has indexed, from its own metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith('scanned_files_total{source=".rpm archive"}'):
                return int(float(line.split()[-1]))
    return 0


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text(errors="replace")) from None
            time.sleep(0.2)
        else:
            return


@pytest.fixture(scope="module")
def http_face(home: Path) -> Iterator[str]:
    port = free_port()
    log = home / "serve.log"
    env = {**os.environ, "RETRACE_CONFIG": str(home / "retrace.toml")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "retrace-mirror", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/__lbheartbeat__", proc, log)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_dnf_reads_the_repository_over_http(http_face: str, tmp_path: Path) -> None:
    listed = run(
        [
            "dnf",
            "--quiet",
            "--disablerepo=*",
            f"--repofrompath=mirror,{http_face}/fedora-40/x86_64",
            "--enablerepo=mirror",
            f"--setopt=cachedir={tmp_path}",
            "repoquery",
            "--location",
            "crasher-debuginfo",
        ],
        timeout=120,
    )
    (location,) = listed.stdout.split()
    assert (
        location == f"{http_face}/fedora-40/x86_64/Packages/crasher-debuginfo-1.0-1.fc40.x86_64.rpm"
    )
    with urllib.request.urlopen(location, timeout=10) as answer:
        assert answer.read(4) == b"\xed\xab\xee\xdb"  # an RPM's lead


def test_metrics_and_heartbeats(http_face: str, crash_fixtures: Fixtures) -> None:
    with urllib.request.urlopen(f"{http_face}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "# TYPE retrace_mirror_packages gauge" in text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["retrace_mirror_packages"] == len(crash_fixtures.rpms)
    assert values["retrace_mirror_packages_to_reindex"] == 0
    with urllib.request.urlopen(f"{http_face}/__heartbeat__", timeout=10) as answer:
        assert answer.status == 200
        assert b'"store": "ok"' in answer.read()
    with urllib.request.urlopen(f"{http_face}/__version__", timeout=10) as answer:
        assert b"retrace-server" in answer.read()


def test_debuginfod_over_the_repository_gives_gdb_the_symbols(
    home: Path, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "debuginfod.log"
    env = {
        **os.environ,
        "RETRACE_CONFIG": str(home / "retrace.toml"),
        "PYTHON": sys.executable,
        "DEBUGINFOD_DB": str(tmp_path / "debuginfod.sqlite"),
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            [PROJECT / "deploy" / "debuginfod.sh", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    crash = crash_fixtures.crash
    library = next(m for m in crash.modules if m.path == "/usr/lib64/libcrasher.so.1")
    client_env = {
        **os.environ,
        "DEBUGINFOD_URLS": url,
        "DEBUGINFOD_CACHE_PATH": str(tmp_path / "client-cache"),
        "DEBUGINFOD_TIMEOUT": "10",
    }
    try:
        wait_http(f"{url}/metrics", server, log)
        # Ask only once the first scan is done: the client caches a miss for minutes.
        rpms = len(crash_fixtures.rpms)
        deadline = time.monotonic() + 120
        while scanned_rpms(url) < rpms:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.3)
        found = run(["debuginfod-find", "debuginfo", library.build_id], env=client_env, timeout=60)
        assert found.returncode == 0, found.stderr + log.read_text(errors="replace")
        assert Path(found.stdout.strip()).stat().st_size > 0

        # The binaries as the crashed machine had them, and no debug file at all: the
        # symbols can only come from debuginfod.
        root = tmp_path / "root"
        for rpm in crash_fixtures.rpms:
            if not rpm.is_debug:
                unpack_rpm(rpm.path, root)
        empty = tmp_path / "no-debug-files"
        empty.mkdir()
        gdb = run(
            [
                "gdb",
                "-batch",
                "-nx",
                "-iex",
                f"set sysroot {root}",
                "-iex",
                f"set debug-file-directory {empty}",
                "-iex",
                "set debuginfod enabled on",
                "-ex",
                "backtrace",
                str(root / crash.executable.lstrip("/")),
                str(crash.coredump),
            ],
            env=client_env,
            timeout=300,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert f"in {crash.function} (" in gdb.stdout, gdb.stdout + gdb.stderr
    assert f"at {crash.source_file}:{crash.line}" in gdb.stdout, gdb.stdout + gdb.stderr
