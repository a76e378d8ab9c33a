"""The bubblewrap sandbox gdb runs in, probed from inside with ordinary tools."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.analyzer.sandbox import CORE, ROOT, Sandbox, SandboxMode, SandboxUnavailable
from services.common.runner import CommandError, Result, run

pytestmark = pytest.mark.integration

SANDBOX = Sandbox(SandboxMode.BWRAP, memory_limit_mib=1024)


@pytest.fixture
def task(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "root"
    (root / "usr/lib/debug").mkdir(parents=True)
    (root / "usr/lib/debug/mine.debug").write_text("the task's own debug file")
    core = tmp_path / "coredump"
    core.write_bytes(b"\x7fELF core")
    script = tmp_path / "report.py"
    script.write_text("print('hello')\n")
    return root, core, script


def inside(task: tuple[Path, Path, Path], *argv: str, timeout: float = 30) -> Result:
    root, core, script = task
    return run(
        SANDBOX.wrap(list(argv), root, core, script),
        timeout=timeout,
        check=False,
        preexec=SANDBOX.limits,
    )


def sh(task: tuple[Path, Path, Path], script: str, timeout: float = 30) -> Result:
    return inside(task, "/usr/bin/sh", "-c", script, timeout=timeout)


def test_the_sandbox_starts_here() -> None:
    SANDBOX.check()


def test_gdb_runs_as_an_unprivileged_user(task: tuple[Path, Path, Path]) -> None:
    assert sh(task, "id -u; id -g").stdout.split() == ["65534", "65534"]


def test_the_task_root_and_core_are_there_and_read_only(task: tuple[Path, Path, Path]) -> None:
    result = sh(
        task,
        f"cat {ROOT}/usr/lib/debug/mine.debug; echo; cat {CORE}; echo; "
        f"touch {ROOT}/x || echo root-read-only; touch /usr/x || echo usr-read-only; "
        "touch /x || echo slash-read-only",
    )
    lines = result.stdout.splitlines()
    assert lines[:2] == ["the task's own debug file", "\x7fELF core"]
    assert lines[2:] == ["root-read-only", "usr-read-only", "slash-read-only"]


def test_the_hosts_debug_files_and_home_are_invisible(task: tuple[Path, Path, Path]) -> None:
    # This host has Debian's libc6-dbg installed under /usr/lib/debug.
    assert any(Path("/usr/lib/debug").rglob("*.debug"))
    result = sh(task, "ls -A /usr/lib/debug | wc -l; ls /root /home /etc/passwd 2>&1 | wc -l")
    count, _ = result.stdout.split()
    assert count == "0"
    assert "No such file" in sh(task, "ls /etc/passwd 2>&1").stdout


def test_tmp_is_private_and_writable(task: tuple[Path, Path, Path], tmp_path: Path) -> None:
    marker = Path("/tmp") / f"retrace-sandbox-probe-{tmp_path.name}"
    result = sh(task, f"echo hi > {marker} && cat {marker}")
    assert result.stdout == "hi\n"
    assert not marker.exists()


def test_there_is_no_network(task: tuple[Path, Path, Path]) -> None:
    result = sh(task, "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '")
    assert result.stdout.split() == ["lo"]
    # Even the loopback is a fresh one: the host's broker is not reachable.
    probe = inside(task, "/usr/bin/bash", "-c", "(exec 3<>/dev/tcp/127.0.0.1/5672) && echo reached")
    assert "reached" not in probe.stdout


def test_the_address_space_is_limited(task: tuple[Path, Path, Path]) -> None:
    kib = int(sh(task, "ulimit -v").stdout)
    assert kib == 1024 * 1024


def test_a_hang_is_killed_with_everything_it_started(task: tuple[Path, Path, Path]) -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out"):
        inside(task, "/usr/bin/sh", "-c", "sleep 317 & sleep 318", timeout=2)
    assert time.monotonic() - started < 30
    leftovers = run(["pgrep", "-f", "sleep 31[78]"], timeout=10, check=False)
    assert leftovers.stdout == ""


def test_a_missing_sandbox_is_an_error_never_a_fallback() -> None:
    broken = Sandbox(SandboxMode.BWRAP, memory_limit_mib=1024, bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match='sandbox = "none"'):
        broken.check()
