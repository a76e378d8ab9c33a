"""Each service, started through its real console script, checks only its own sections.

A file written for a newer mirror (a new ``[mirror]`` key, a whole new section) must
not stop an older intake or analyzer; an unknown key in a section a service checks
stops that service, naming the key and the file; ``retrace-admin`` checks them all.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.stack import BIN, Stack, free_port

pytestmark = pytest.mark.integration

NEWER_MIRROR = "[mirror]\nkey_of_a_newer_mirror = 1\n[a_newer_service]\nport = 8090\n"


def wait_serving(stack: Stack, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{stack.base}/settings", timeout=2).close()
        except OSError:
            assert proc.poll() is None, stack.logs()
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        else:
            return


def wait_consuming(stack: Stack, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the analyzer consumes its queue (a loaded broker may take a while)."""
    deadline = time.monotonic() + 180
    while "consuming retrace.analyze.x86_64" not in stack.logs():
        assert proc.poll() is None, stack.logs()
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)


def test_services_start_beside_other_services_new_keys_and_refuse_their_own(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    stack = Stack(tmp_path / "home", make_broker_url())
    settings = stack.home / "retrace.toml"
    stack.write_settings()
    for admin in (("migrate",), ("topology",)):
        done = stack.command("retrace-admin", *admin)
        assert done.returncode == 0, done.stderr

    stack.extra_settings = NEWER_MIRROR
    stack.write_settings()
    # The operator's check names every problem, in every section.
    done = stack.command("retrace-admin", "settings")
    assert done.returncode == 2
    assert f"{settings}: mirror.key_of_a_newer_mirror: unknown key" in done.stderr
    assert f"{settings}: [a_newer_service]: unknown section" in done.stderr
    # The intake and an analyzer start and work with it.
    try:
        intake = stack.start(
            "retrace-intake", "serve", "--bind", f"127.0.0.1:{stack.port}", "--workers", "1"
        )
        wait_serving(stack, intake)
        wait_consuming(stack, stack.start("retrace-analyzer", "run"))
    finally:
        stack.down()
    # Upgrading the intake's tables reads the settings as the intake does; the whole
    # upgrade is the operator's, which checks every section.
    done = stack.command("retrace-admin", "migrate", "--service", "intake")
    assert done.returncode == 0, done.stderr
    assert "intake schema: " in done.stdout
    done = stack.command("retrace-admin", "migrate")
    assert done.returncode == 2
    assert f"{settings}: mirror.key_of_a_newer_mirror: unknown key" in done.stderr
    done = stack.command("retrace-admin", "migrate", "--service", "mirror")
    assert done.returncode == 2
    assert f"{settings}: mirror.key_of_a_newer_mirror: unknown key" in done.stderr
    # The mirror is the one it stops, and says why.
    done = stack.command("retrace-mirror", "reindex")
    assert done.returncode == 2
    assert f"{settings}: mirror.key_of_a_newer_mirror: unknown key" in done.stderr
    assert "a_newer_service" not in done.stderr

    # A key a newer intake would know: the mirror goes on, the intake stops, named.
    stack.extra_settings = "[intake]\nmax_runing_tasks = 3\n"
    stack.write_settings()
    done = stack.command("retrace-mirror", "reindex")
    assert done.returncode == 0, done.stderr
    assert "re-indexed 0 packages" in done.stdout
    done = subprocess.run(
        [str(BIN / "retrace-intake"), "serve", "--bind", f"127.0.0.1:{free_port()}"],
        env=stack.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{settings}: intake.max_runing_tasks: unknown key" in done.stderr
    # ... and so does one of its keys set from the environment, naming the variable.
    stack.extra_settings = ""
    stack.write_settings()
    stack.overrides["RETRACE_ANALYZER__GDB_TIMOUT"] = "30"
    done = stack.command("retrace-analyzer", "run")
    assert done.returncode == 2
    assert "RETRACE_ANALYZER__GDB_TIMOUT (environment): analyzer.gdb_timout: unknown key" in (
        done.stderr
    )
