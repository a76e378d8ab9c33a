"""retrace-client against the real stack (intake, RabbitMQ, analyzer, mirror import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration

CLIENT = str(Path(sys.executable).parent / "retrace-client")
STAND_INS = Path(__file__).parent.parent / "fixtures" / "coredumpctl"


def client(
    stack: Stack, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [CLIENT, "--state", str(tmp_path / "tasks.json"), *args],
            env={**os.environ, "RETRACE_SERVER_URI": stack.base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise AssertionError(f"retrace-client hung; it said:\n{said}\n{stack.logs()}") from exc


def problem_dir(fixtures: Fixtures, tmp_path: Path) -> Path:
    copy = tmp_path / "problem"
    shutil.copytree(fixtures.crash.problem_dir, copy)
    return copy


def test_batch_sends_waits_prints_and_saves_the_backtrace(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    directory = problem_dir(crash_fixtures, tmp_path)
    done = client(
        stack, tmp_path, "batch", "--dir", str(directory), "--status-delay", "0.5", "--force"
    )
    assert done.returncode == 0, done.stderr
    crash = crash_fixtures.crash
    assert f"in {crash.function} (" in done.stdout
    assert f"{crash.local_name} = {crash.local_value}" in done.stdout
    assert "FINISHED_SUCCESS" in done.stderr
    assert (directory / "backtrace").read_text() == done.stdout
    # The task is remembered, so later commands need only its id.
    [task] = json.loads((tmp_path / "tasks.json").read_text())["tasks"]
    status = client(stack, tmp_path, "status", task)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "FINISHED_SUCCESS"
    structured = client(stack, tmp_path, "backtrace", task, "--json")
    assert structured.returncode == 0, structured.stderr
    assert json.loads(structured.stdout)["crash_function"] == crash.function
    log = client(stack, tmp_path, "log", task)
    assert log.returncode == 0
    assert "Retrace finished successfully." in log.stdout


def test_create_then_backtrace_by_task_id(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.crash
    created = client(
        stack, tmp_path, "create", "--core", str(crash.coredump),
        "--executable", crash.executable, "--package", crash.package,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    task = created.stdout.split("Task Id: ")[1].split()[0]
    # Each answer carries the next single-use password; the client follows them.
    deadline = time.monotonic() + 180
    while (status := client(stack, tmp_path, "status", task)).stdout.startswith("PENDING"):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.5)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("FINISHED_SUCCESS")
    password = json.loads((tmp_path / "tasks.json").read_text())["tasks"][task]["password"]
    # Another machine that knows only the id and the current password.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = client(stack, elsewhere, "backtrace", task, "--password", password)
    assert done.returncode == 0, done.stderr
    assert crash.function in done.stdout


def test_systemd_coredump_crash_through_coredumpctl(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    """systemd does not run here: a stand-in coredumpctl answers from a journal entry."""
    crash = crash_fixtures.crash
    journal = tmp_path / "journal.json"
    journal.write_text(
        json.dumps(
            {
                "COREDUMP_PID": "4242",
                "COREDUMP_EXE": crash.executable,
                "COREDUMP_PACKAGE_NAME": "crasher",
                "COREDUMP_PACKAGE_VERSION": "1.0-1.fc40",
                "COREDUMP_CMDLINE": crash.executable,
                "COREDUMP_FILENAME": str(crash.coredump),
            }
        )
    )
    # Run by this very interpreter: a shebang through a version-manager shim can stall.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "coredumpctl"
    source = (STAND_INS / "coredumpctl").read_text().split("\n", 1)[1]
    stand_in.write_text(f"#!{sys.executable}\n{source}")
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_COREDUMP_JOURNAL": str(journal)}
    done = client(
        stack, tmp_path, "batch", "--coredumpctl", "4242", "--status-delay", "0.5",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert crash.function in done.stdout
    missing = client(stack, tmp_path, "create", "--coredumpctl", "999", env=env)
    assert missing.returncode == 2
    assert "No coredumps found" in missing.stderr


def test_an_unknown_package_is_refused_before_uploading(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.crash
    done = client(
        stack, tmp_path, "create", "--core", str(crash.coredump),
        "--executable", crash.executable, "--package", "nosuchpackage-1.0-1.fc40",
    )  # fmt: skip
    assert done.returncode == 3
    assert "does not have nosuchpackage-1.0-1.fc40" in done.stderr
    assert not (tmp_path / "tasks.json").exists()


def test_a_core_too_large_for_the_server_is_refused_before_uploading(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    tmp_path: Path,
) -> None:
    small = start_stack(
        tmp_path_factory.mktemp("small"),
        make_broker_url(),
        crash_fixtures,
        overrides={"RETRACE_INTAKE__MAX_UNPACKED_SIZE_MIB": "1"},
    )
    big_core = tmp_path / "core"
    big_core.write_bytes(crash_fixtures.crash.coredump.read_bytes() + bytes(2 << 20))
    try:
        crash = crash_fixtures.crash
        done = client(
            small, tmp_path, "create", "--core", str(big_core),
            "--executable", crash.executable, "--package", crash.package,
        )  # fmt: skip
    finally:
        small.down()
    assert done.returncode == 3
    assert "the server takes at most" in done.stderr


def test_a_task_the_client_does_not_know_asks_for_its_password(
    stack: Stack, tmp_path: Path
) -> None:
    done = client(stack, tmp_path, "status", "UnknownTask123")
    assert done.returncode == 2
    assert "--password" in done.stderr
    wrong = client(stack, tmp_path, "status", "UnknownTask123", "--password", "x" * 32)
    assert wrong.returncode == 3


def test_an_unreachable_server_is_exit_code_4(tmp_path: Path) -> None:
    done = subprocess.run(
        [CLIENT, "--uri", "http://127.0.0.1:9", "settings"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 4
    assert "cannot talk to http://127.0.0.1:9" in done.stderr


def test_a_full_server_is_refused_before_uploading(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    tmp_path: Path,
) -> None:
    full = start_stack(
        tmp_path_factory.mktemp("full"),
        make_broker_url(),
        crash_fixtures,
        overrides={"RETRACE_INTAKE__MAX_RUNNING_TASKS": "1"},
    )
    try:
        analyzer = full.processes[1]
        analyzer.terminate()  # nothing takes the first task off the queue
        analyzer.wait(timeout=60)
        crash = crash_fixtures.crash
        source = ("--core", str(crash.coredump), "--executable", crash.executable)
        first = client(full, tmp_path, "create", *source, "--package", crash.package)
        assert first.returncode == 0, first.stderr
        second = client(full, tmp_path, "create", *source, "--package", crash.package)
    finally:
        full.down()
    assert second.returncode == 3
    assert "the server is full (1 of 1 tasks)" in second.stderr
