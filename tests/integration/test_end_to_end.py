"""One real crash in, one real backtrace out: intake, RabbitMQ, analyzer and mirror.

Everything is real: the RPMs were built by rpmbuild, the core was written by the
kernel, the services run as separate processes through their console scripts,
gdb runs on the core, and the broker is the local RabbitMQ.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.messages import TaskFinishedV1, parse
from schemas.topology import EXCHANGE, TASK_FINISHED
from services.common.bus import connect
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, pack_problem_dir, start_stack, wait_gone

pytestmark = pytest.mark.integration

XZ = {"Content-Type": "application/x-xz-compressed-tar"}


def submit(stack: Stack, fixtures: Fixtures, tmp: Path) -> tuple[str, str]:
    body = pack_problem_dir(fixtures.crash.problem_dir, tmp / "crash.tar.xz").read_bytes()
    status, headers, text = stack.request("POST", "/create", body, XZ)
    assert status == 201, (text, stack.logs())
    # Spelled on the wire exactly as the original server did, for clients that match it so.
    assert {"X-Task-Id", "X-Task-Password"} <= set(headers.keys())
    return headers["X-Task-Id"], headers["X-Task-Password"]


def test_a_real_crash_is_retraced_through_the_whole_system(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.crash
    events = connect(stack.broker_url)
    spy_channel = events.channel()
    spy = spy_channel.queue_declare("", exclusive=True).method.queue
    assert spy is not None
    spy_channel.queue_bind(spy, EXCHANGE, routing_key=TASK_FINISHED.topic)

    task_id, password = submit(stack, crash_fixtures, tmp_path)
    assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()
    auth = {"X-Task-Password": password}

    status, _, body = stack.request("GET", f"/{task_id}/backtrace", headers=auth)
    assert status == 200
    backtrace = body.decode()
    # The crashing frame: function, source file and line, and a local's value.
    frame0 = re.search(r"^#0 .*$", backtrace, re.MULTILINE)
    assert frame0 is not None, backtrace
    assert f"in {crash.function} (" in frame0.group()
    assert frame0.group().endswith(f"at {crash.source_file}:{crash.line}")
    assert f"{crash.local_name} = {crash.local_value}" in backtrace
    # libc's frames were symbolized down to source lines, which only glibc-debuginfo gives.
    libc_frames = [
        line for line in backtrace.splitlines() if re.match(r"#\d+ ", line) and "stdlib/" in line
    ]
    assert libc_frames, backtrace
    assert any(crash.libc_entry in line for line in libc_frames), backtrace
    # Paths read as installed, not as the analyzer's private root.
    assert "/usr/lib64/libc.so.6" in backtrace
    assert "/cache/" not in backtrace

    # The structured form, for programs.
    status, headers, body = stack.request(
        "GET", f"/{task_id}/backtrace", headers={**auth, "Accept": "application/json"}
    )
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert report["crash_function"] == crash.function
    crashing = next(t for t in report["threads"] if t["crashing"])
    assert crashing["frames"][0]["line"] == crash.line

    status, _, body = stack.request("GET", f"/{task_id}/log", headers=auth)
    assert status == 200
    log = body.decode()
    glibc = crash_fixtures.rpm("glibc")
    expected = f"{glibc.name}-{glibc.version}-{glibc.release}.{glibc.arch}"
    libc_line = next(line for line in log.splitlines() if "/usr/lib64/libc.so.6 [" in line)
    assert f"{expected}, debuginfo glibc-debuginfo-{glibc.version}-{glibc.release}" in libc_line
    assert "NOT FOUND" not in log
    assert "GNU gdb" in log

    # The core is deleted once the task is final; the event says where it crashed.
    task_dir = stack.home / "var" / "spool" / task_id
    wait_gone(task_dir / "crash" / "coredump")
    event = None
    for _ in range(50):
        method, _props, raw = spy_channel.basic_get(spy, auto_ack=True)
        if method is not None and raw is not None:
            event = parse(TaskFinishedV1, raw)
            break
        time.sleep(0.1)
    events.close()
    assert event is not None
    assert event.task_id == task_id
    assert event.outcome == "success"
    assert event.crash_function == crash.function
    assert event.crash_module == "/usr/lib64/libcrasher.so.1"


def test_the_host_debug_files_never_help(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    tmp_path: Path,
) -> None:
    """Without glibc-debuginfo in the mirror, libc frames stay unsymbolized.

    This machine has Debian's libc6-dbg installed, with the very same build-ids: a
    retrace that let gdb look at the host's /usr/lib/debug would still show libc's
    source lines here, and look right for the wrong reason.
    """
    stack = start_stack(
        tmp_path_factory.mktemp("nolibcdebug"),
        make_broker_url(),
        crash_fixtures,
        leave_out=("glibc-debuginfo",),
    )
    try:
        task_id, password = submit(stack, crash_fixtures, tmp_path)
        assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()
        auth = {"X-Task-Password": password}
        backtrace = stack.request("GET", f"/{task_id}/backtrace", headers=auth)[2].decode()
        log = stack.request("GET", f"/{task_id}/log", headers=auth)[2].decode()
    finally:
        stack.down()
    assert f"at {crash_fixtures.crash.source_file}:{crash_fixtures.crash.line}" in backtrace
    assert "stdlib/" not in backtrace
    assert "from /usr/lib64/libc.so.6" in backtrace
    assert re.search(r"warning: no debuginfo for /usr/lib64/libc\.so\.6", log), log
