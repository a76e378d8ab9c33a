"""The seed's "How To Test": upload with curl, then its exact wget commands.

``<Task-Id>`` stands for the task's URL, and the seed's commands add a slash to it
("<Task-Id>/", "<Task-Id>/log"): the real ``wget`` and ``curl`` binaries run them
against a running intake and analyzer, following the single-use passwords.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, pack_problem_dir, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("seed"), make_broker_url(), crash_fixtures)
    yield stack
    stack.down()


def header(text: str, name: str) -> str | None:
    found = re.findall(rf"^\s*{name}:\s*(\S+)\s*$", text, re.MULTILINE | re.IGNORECASE)
    return found[-1] if found else None


def wget(cwd: Path, password: str, url: str, *options: str) -> tuple[int, str]:
    """The seed's command line; returns wget's exit code and its ``-S`` output."""
    done = subprocess.run(
        [
            "wget",
            "-S",
            "--no-check-certificate",
            *options,
            f"--header=X-Task-Password: {password}",
            url,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr


def test_the_seeds_curl_and_wget_commands_work(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    archive = pack_problem_dir(crash_fixtures.crash.problem_dir, tmp_path / "crash.tar.xz")
    upload = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/x-xz-compressed-tar",
            "--data-binary",
            f"@{archive}",
            f"{stack.base}/create",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert upload.stdout.startswith("HTTP/1.1 201"), upload.stdout
    task_id, password = header(upload.stdout, "X-Task-Id"), header(upload.stdout, "X-Task-Password")
    assert task_id
    assert password
    task_url = f"{stack.base}/{task_id}"  # <Task-Id>

    status = "PENDING"
    deadline = time.monotonic() + 240
    while status == "PENDING":
        assert time.monotonic() < deadline, stack.logs()
        code, out = wget(tmp_path, password, f"{task_url}/", "-O", "/dev/null")
        assert code == 0, out
        status = header(out, "X-Task-Status") or ""
        password = header(out, "X-Task-Password") or ""
        if status == "PENDING":
            time.sleep(0.5)
    assert status == "FINISHED_SUCCESS", stack.logs()

    code, out = wget(tmp_path, password, f"{task_url}/log")
    assert code == 0, out
    password = header(out, "X-Task-Password") or ""
    assert "GNU gdb" in (tmp_path / "log").read_text()

    code, out = wget(tmp_path, password, f"{task_url}/backtrace")
    assert code == 0, out
    backtrace = (tmp_path / "backtrace").read_text()
    assert f"in {crash_fixtures.crash.function} (" in backtrace

    # The backtrace answer, too, carried the next password.
    code, out = wget(tmp_path, header(out, "X-Task-Password") or "", f"{task_url}/", "-O", "-")
    assert code == 0, out
