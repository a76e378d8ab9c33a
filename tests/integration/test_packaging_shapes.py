"""Full backtraces whatever the packaging: the fixtures' packaging shapes, retraced.

Each shape is a real crash of tests/fixtures (see ``Expect`` in tests/fixtures/build.py):
build-id links ``none`` (found only by path and .gnu_debuglink, DWARF shared through
dwz) or ``alldebug`` (every link in the debuginfo packages); a C++ exception thrown
through a library that has neither debuginfo nor a .build-id link; a crash whose
``package`` file names the build, of which no package bears the name; a binary
named only by its MiniDebugInfo; and ABRT's report of a crash in a container.

The whole fixture set is mirrored, as an operator imports a release, and each crash
is retraced by the real analyzer. A retrace is complete when the backtrace names
every frame of the fixture's own code and of the libraries it names, in order down
to ``main`` (with file:line and a local where there is debuginfo), and when the log
found the binary of every module of the core.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from services.common.data.intake import TaskStatus
from tests.fixtures.build import ExpectedFrame, ExtraCrash, Fixtures, elf_symbols, unpack_rpm
from tests.integration.stack import Stack, pack_problem_dir, start_stack
from tests.integration.test_analyzer import Analyzer
from tests.integration.test_end_to_end import XZ

pytestmark = pytest.mark.integration

SHAPES = (
    "buildid-none-dwz",
    "buildid-alldebug",
    "cxx-through-nodebug-lib",
    "subpackage-named-by-build",
    "minidebuginfo",
)
# The analyzer may ask the mirror for a crashed build once, and waits little: a
# retrace that should not wait at all shows it did, without stalling the module.
FETCH_WAIT_SECONDS = 2
# "12:00:00   /usr/lib64/libc.so.6 [93ac…]: glibc-2.36-9.fc40.x86_64, debuginfo NOT FOUND"
# (and perhaps more: how each was found)
MODULE_LINE = re.compile(
    r"^\S+ {3}(?P<path>\S+) \[(?P<build_id>[0-9a-f]+|no build-id)\]: "
    r"(?P<binary>NOT FOUND|[^\s,;]+), debuginfo (?P<debuginfo>NOT FOUND|[^\s,;]+)",
    re.MULTILINE,
)
# "12:00:00   glibc-2.36-9.fc40.x86_64 (fedora-40)": a package of the root, and its release
ROOT_PACKAGE_LINE = re.compile(r"^\S+ {3}\S+ \((?P<release>[a-z]+-[0-9a-z]+)\)$", re.MULTILINE)
WAITING = "waiting for the mirror"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("packaging-shapes"),
        make_broker_url(),
        crash_fixtures,  # every RPM of the fixture set
        overrides={
            "RETRACE_ANALYZER__FETCH_ATTEMPTS": "1",
            "RETRACE_ANALYZER__FETCH_WAIT_SECONDS": str(FETCH_WAIT_SECONDS),
        },
    )
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def analyzer(stack: Stack) -> Analyzer:
    return Analyzer(stack)


def finish(analyzer: Analyzer, task_id: str, timeout: float = 180) -> tuple[TaskStatus, set[str]]:
    """Waits for the task's end; its status, and every progress text seen on the way."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = analyzer.store.intake.get_task(task_id)
        assert task is not None
        seen.add(task.progress)
        if task.status.final:
            return task.status, seen
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish\n{analyzer.stack.logs()}")


def _function(frame: dict[str, Any]) -> str:
    """gdb's name of a frame's function, without a C++ parameter list."""
    return str(frame.get("function") or "??").split("(", 1)[0]


def _shown(frames: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        f"  #{n} {_function(f)} {Path(f['file']).name if f.get('file') else '-'}:"
        f"{f.get('line') or '-'} in {f.get('module')}"
        for n, f in enumerate(frames)
    )


def frame_problems(
    frames: Sequence[dict[str, Any]], expected: Sequence[ExpectedFrame]
) -> list[str]:
    """What the crashing thread's ``frames`` (backtrace.json) lack of ``expected``,
    which must appear in that order, innermost first."""
    problems: list[str] = []
    position = 0
    for want in expected:
        index = next(
            (i for i in range(position, len(frames)) if _function(frames[i]) == want.function),
            None,
        )
        if index is None:
            problems.append(f"no frame of {want.function} ({want.module}) after frame #{position}")
            continue
        position = index + 1
        frame = frames[index]
        if frame.get("module") != want.module:
            problems.append(f"frame #{index} {want.function} is in {frame.get('module')}")
        if want.source_file is not None:
            where = (Path(frame["file"]).name if frame.get("file") else None, frame.get("line"))
            if where != (want.source_file, want.line) or not frame.get("symbolized"):
                problems.append(
                    f"frame #{index} {want.function} is at {where[0]}:{where[1]}, "
                    f"not {want.source_file}:{want.line}"
                )
    return problems


def module_problems(log: str, crash: ExtraCrash, fixtures: Fixtures) -> list[str]:
    """Modules of the core (the vDSO aside) whose binary the log does not say was found
    in the package holding it, or whose existing debuginfo it did not find."""
    # By build-id: the core may name the loader by its PT_INTERP path (/lib64/...) or
    # by the file the kernel mapped (/usr/lib64/...).
    lines = {m["build_id"]: m for m in MODULE_LINE.finditer(log)}
    nevra = {rpm.nvr: rpm.nevra for rpm in fixtures.rpms}
    problems: list[str] = []
    for module in crash.modules:
        if module.package is None:  # the vDSO
            continue
        line = lines.get(module.build_id)
        if line is None:
            problems.append(f"the log has no line for {module.path} [{module.build_id}]")
            continue
        if line["binary"] != nevra[module.package]:
            problems.append(
                f"{module.path}: binary {line['binary']}, expected {nevra[module.package]}"
            )
        if module.debuginfo_package is not None and line["debuginfo"] == "NOT FOUND":
            problems.append(
                f"{module.path}: debuginfo NOT FOUND, expected {nevra[module.debuginfo_package]}"
            )
    return problems


@pytest.mark.parametrize("name", SHAPES)
def test_every_packaging_shape_is_retraced_in_full(
    analyzer: Analyzer, crash_fixtures: Fixtures, name: str, tmp_path: Path
) -> None:
    crash = crash_fixtures.extra(name)
    assert crash.frames, f"{name} has no expected frames: the fixture is stale"
    assert crash.frames[-1].function == "main"
    task_id = analyzer.inject(crash.problem_dir, name)
    status, progress = finish(analyzer, task_id)
    log = analyzer.result(task_id, "log")
    assert status == TaskStatus.SUCCESS, log

    report = json.loads(analyzer.result(task_id, "backtrace.json"))
    backtrace = analyzer.result(task_id, "backtrace")
    assert report["signal"]["name"] == crash.signal
    (crashing,) = [t for t in report["threads"] if t["crashing"]]
    problems = module_problems(log, crash, crash_fixtures)
    problems += frame_problems(crashing["frames"], crash.frames)
    if crash.local_name is not None:
        local = f"{crash.local_name} = {crash.local_value}"
        if local not in backtrace:
            problems.append(f"no '{local}' (in {crash.local_function}) in the backtrace")
    assert not problems, (
        "\n".join(problems) + f"\n\nframes:\n{_shown(crashing['frames'])}\n\nlog:\n{log}"
    )
    assert not crashing["truncated"]

    if name == "subpackage-named-by-build":
        # The build is mirrored, only no package bears its name: nothing to wait for.
        assert "could not be fetched" not in log
        assert not [text for text in progress if WAITING in text], progress
        assert analyzer.store.analyzer.task_fetch(task_id) is None
    if name == "minidebuginfo":
        assert not any(rpm.name.startswith("minidebug-debug") for rpm in crash_fixtures.rpms)
        unpack_rpm(crash_fixtures.rpm("minidebug").path, tmp_path)
        binary = tmp_path / crash.executable.lstrip("/")
        dynamic = elf_symbols(binary, dynamic=True)
        assert crash.function in crash.minidebuginfo_only
        assert not set(crash.minidebuginfo_only) & dynamic, dynamic


def test_a_crash_in_a_container_is_retraced_for_the_release_inside_it(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    # ABRT's problem directory of a crash in a container: os_release is the host's
    # (41), os_release_in_rootdir the container's (40), whose packages crashed.
    crash = crash_fixtures.extra("abrt-rootdir")
    assert crash.rootdir is not None
    assert crash.os_release_in_rootdir == "Fedora release 40 (Forty)"
    assert "41" in crash.os_release
    body = pack_problem_dir(crash.problem_dir, tmp_path / "crash.tar.xz").read_bytes()
    status, headers, text = stack.request("POST", "/create", body, XZ)
    assert status == 201, text
    task_id, password = headers["X-Task-Id"], headers["X-Task-Password"]
    auth = {"X-Task-Password": password}
    assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()

    _, _, body = stack.request("GET", f"/{task_id}/log", headers=auth)
    log = body.decode()
    status, _, body = stack.request(
        "GET", f"/{task_id}/backtrace", headers={**auth, "Accept": "application/json"}
    )
    assert status == 200, log
    (crashing,) = [t for t in json.loads(body)["threads"] if t["crashing"]]
    problems = frame_problems(crashing["frames"], crash.frames)
    assert not problems, "\n".join(problems) + f"\n\nframes:\n{_shown(crashing['frames'])}"
    # The release the crash declares is the container's (os_release_in_rootdir), and
    # the packages' dist tags (.fc40), not the host's os_release (41), make the root.
    assert re.search(r"(?i)\bdeclares?\b.*\bfedora-40\b", log), log
    releases = {m["release"] for m in ROOT_PACKAGE_LINE.finditer(log)}
    assert releases == {"fedora-40"}, log
    assert not re.search(r"(?i)\bdeclares?\b.*\bfedora-41\b|fedora-41 is used", log), log


def test_the_packages_dist_tags_win_over_a_release_the_crash_declares_wrongly(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    # The same crash reported from the host alone: it declares the host's release (41),
    # but every package found by build-id is a .fc40 build, and those make the root.
    crash = crash_fixtures.extra("abrt-rootdir")
    problem = tmp_path / "problem"
    shutil.copytree(crash.problem_dir, problem)
    (problem / "rootdir").unlink()
    (problem / "os_release_in_rootdir").unlink()
    body = pack_problem_dir(problem, tmp_path / "crash.tar.xz").read_bytes()
    status, headers, text = stack.request("POST", "/create", body, XZ)
    assert status == 201, text
    task_id, password = headers["X-Task-Id"], headers["X-Task-Password"]
    assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()
    _, _, body = stack.request("GET", f"/{task_id}/log", headers={"X-Task-Password": password})
    log = body.decode()
    assert "The crash declares the release fedora-41" in log, log
    assert (
        "the crash declares fedora-41, but the packages found by build-id are built for "
        "fedora-40: fedora-40 is used"
    ) in log, log
    assert {m["release"] for m in ROOT_PACKAGE_LINE.finditer(log)} == {"fedora-40"}, log
