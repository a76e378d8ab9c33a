"""Minimal cores retrace as full ones: every fixture crash, through the real analyzer.

Each crash is retraced twice by one running stack, from its full core and from the
minimal core retrace-client makes of it.  The frames (function, file, line, address,
module) must be identical, and so must every line of the backtrace, locals included;
where a line differs, the difference must be gdb's ``<error: Cannot access memory at
address …>`` for an address inside a range the client's note says it dropped, the
rest of the line unchanged.  Each crash's differences are listed in
:data:`DIFFERENCES`: one more, or one fewer, fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.minicore import Options, minimize, read_note
from services.common.data.intake import TaskStatus
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, start_stack
from tests.integration.test_analyzer import Analyzer
from tests.integration.test_client import STAND_INS, client

pytestmark = pytest.mark.integration

CANNOT_ACCESS = re.compile(r"<error: Cannot access memory at address (0x[0-9a-f]+)>")
# What gdb shows differently from a minimal core, per crash: the locals and arguments
# (name = value) whose value is a Cannot-access error there; every other crash: none.
DIFFERENCES = {
    # __assert_fail_base's message buffer, malloc'd: in the heap.
    "assert-abort": ("str",),
    # main's 100 MB malloc'd block, printed as a string by gdb.
    "many-libs-big-heap": ("heap",),
    # A char * into one of the 20 000 heap chunks, in count_chunks's frame line twice
    # (#0 of the thread, and gdb's frame #0 line before it).
    "many-chunks-big-bss": ("first_label", "first_label"),
}


@dataclass(frozen=True)
class Retraced:
    """One crash retraced from its full core and from its minimal core."""

    name: str
    full: dict[str, str]  # result file name -> text
    minimal: dict[str, str]
    note: dict[str, object]
    full_size: int
    minimal_size: int


def all_crashes(fixtures: Fixtures) -> dict[str, Path]:
    """Every fixture crash's problem directory, by name."""
    crashes = {"segv-in-lib": fixtures.crash.problem_dir}
    crashes.update({extra.name: extra.problem_dir for extra in fixtures.extra_crashes})
    return crashes


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("minimal"),
        make_broker_url(),
        crash_fixtures,
        overrides={"RETRACE_ANALYZER__FETCH_ATTEMPTS": "0"},
    )
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def retraced(
    stack: Stack, crash_fixtures: Fixtures, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Retraced]:
    """Every crash, full and minimal, given to the analyzer at once and waited for."""
    analyzer = Analyzer(stack)
    work = tmp_path_factory.mktemp("minimal-crashes")
    sizes: dict[str, tuple[int, int]] = {}
    notes: dict[str, dict[str, object]] = {}
    for name, problem_dir in all_crashes(crash_fixtures).items():
        copy = work / name
        shutil.copytree(problem_dir, copy)
        (copy / "coredump").unlink()
        outcome = minimize(problem_dir / "coredump", copy / "coredump", Options())
        note = read_note(copy / "coredump")
        assert note is not None
        notes[name] = note
        sizes[name] = (outcome.full_size, outcome.size)
        analyzer.inject(problem_dir, f"full-{name}")
        analyzer.inject(copy, f"minimal-{name}")
    out = {}
    for name, note in notes.items():
        results = []
        for kind in ("full", "minimal"):
            task = f"{kind}-{name}"
            status = analyzer.wait(task, timeout=300)
            assert status == TaskStatus.SUCCESS, (task, analyzer.result(task, "log"))
            results.append(
                {
                    file: analyzer.result(task, file)
                    for file in ("backtrace", "backtrace.json", "log")
                }
            )
        out[name] = Retraced(name, results[0], results[1], note, *sizes[name])
    return out


def dropped_ranges(note: dict[str, object]) -> list[tuple[int, int]]:
    entries = note["dropped"]
    assert isinstance(entries, list)
    return [(int(d["start"], 16), int(d["end"], 16)) for d in entries]


def difference(full: str, minimal: str, dropped: list[tuple[int, int]]) -> str | None:
    """Why ``minimal`` may stand for ``full``: the name of the value that gdb could not
    read, when the lines differ only by Cannot-access errors for dropped addresses.
    Raises AssertionError for any other difference."""
    errors = list(CANNOT_ACCESS.finditer(minimal))
    assert errors, f"a line differs, and not by a Cannot access memory:\n{full}\n{minimal}"
    for error in errors:
        address = int(error[1], 16)
        assert any(start <= address < end for start, end in dropped), (
            f"{error[0]} is not in a dropped range:\n{minimal}"
        )
    # Everything but the errors is the same; an error stands for what gdb read before.
    pattern = ".*?".join(re.escape(piece) for piece in CANNOT_ACCESS.sub("\0", minimal).split("\0"))
    assert re.fullmatch(pattern, full), f"the rest of the line differs:\n{full}\n{minimal}"
    name = re.search(r"(\w+) ?= ?0x[0-9a-f]+ " + re.escape(errors[0][0]), minimal)
    return name[1] if name else minimal


def crash_frames(report: dict[str, object]) -> list[object]:
    threads = report["threads"]
    assert isinstance(threads, list)
    (crashing,) = [t for t in threads if t["crashing"]]
    return list(crashing["frames"])


@pytest.mark.parametrize(
    "name",
    [
        "segv-in-lib", "dwz-in-lib", "assert-abort", "second-thread", "cxx-uncaught",
        "stack-overflow", "no-build-id", "many-libs-big-heap", "many-chunks-big-bss",
        "buildid-none-dwz", "buildid-alldebug", "cxx-through-nodebug-lib",
        "subpackage-named-by-build", "minidebuginfo", "abrt-rootdir",
    ],
)  # fmt: skip
def test_a_minimal_core_retraces_as_its_full_core(retraced: dict[str, Retraced], name: str) -> None:
    crash = retraced[name]
    full, minimal = (
        json.loads(crash.full["backtrace.json"]),
        json.loads(crash.minimal["backtrace.json"]),
    )
    assert minimal["signal"] == full["signal"]
    assert minimal["crashing_thread"] == full["crashing_thread"]
    assert (minimal["crash_function"], minimal["crash_module"]) == (
        full["crash_function"],
        full["crash_module"],
    )
    # The crash thread's frames: function, file:line, address, module, all identical.
    assert crash_frames(minimal) == crash_frames(full)
    assert [len(t["frames"]) for t in minimal["threads"]] == [
        len(t["frames"]) for t in full["threads"]
    ]
    assert minimal["modules"] == full["modules"]
    # Every line of the backtrace, locals included, or a Cannot access memory there.
    full_lines = crash.full["backtrace"].splitlines()
    minimal_lines = crash.minimal["backtrace"].splitlines()
    assert len(minimal_lines) == len(full_lines)
    dropped = dropped_ranges(crash.note)
    found = [
        difference(a, b, dropped) for a, b in zip(full_lines, minimal_lines, strict=True) if a != b
    ]
    print(f"{name}: {crash.minimal_size} of {crash.full_size} bytes; differences: {found}")
    assert tuple(found) == DIFFERENCES.get(name, ())
    # The analyzer says the core was minimal, and what it lacked.
    log = crash.minimal["log"]
    assert "The core is minimal (retrace-client --minimal)" in log
    assert f"it lacks {len(dropped)} ranges of memory" in log
    for start, end in dropped[:32]:
        assert f"  lacks {start:#x}-{end:#x}: " in log
    assert "The core is minimal" not in crash.full["log"]


def test_the_minimal_cores_are_small_where_the_memory_is_data(
    retraced: dict[str, Retraced],
) -> None:
    big = retraced["many-libs-big-heap"]
    assert big.full_size > 100 << 20
    assert big.minimal_size <= big.full_size * 0.02
    chunks = retraced["many-chunks-big-bss"]
    assert chunks.minimal_size <= chunks.full_size * 0.02
    # A stack is never cut by the size bound: the overflowed 8 MiB stack stays whole.
    overflow = retraced["stack-overflow"]
    assert overflow.note["kept"]["stacks"] >= 8 << 20  # type: ignore[index]
    assert "<error: Cannot access memory" in chunks.minimal["backtrace"]


def test_the_client_sends_minimal_cores_from_a_problem_dir_a_core_and_coredumpctl(
    stack: Stack, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    chunks = crash_fixtures.extra("many-chunks-big-bss")
    directory = tmp_path / "problem"
    shutil.copytree(chunks.problem_dir, directory)
    started = time.monotonic()
    done = client(
        stack, tmp_path, "batch", "--dir", str(directory), "--status-delay", "0.2",
        "--minimal-report", "--blank-environment",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    print(f"batch --dir --minimal: {time.monotonic() - started:.2f} s")
    assert f"in {chunks.function} (" in done.stdout
    assert "first_label=0x" in done.stdout
    assert "<error: Cannot access memory at address 0x" in done.stdout
    assert "kept:" in done.stderr
    assert "anonymous mapping of 16.0 MiB, over the 64.0 KiB bound" in done.stderr
    assert "the environment strings are blanked (zeroed)" in done.stderr
    assert (directory / "coredump").stat().st_size > 16 << 20  # the user's core is untouched
    [task] = json.loads((tmp_path / "tasks.json").read_text())["tasks"]
    log = client(stack, tmp_path, "log", task)
    assert "The core is minimal (retrace-client --minimal)" in log.stdout
    assert "The client blanked the environment strings" in log.stdout

    # A plain core, minimal because the settings file says so.
    main = crash_fixtures.crash
    settings = tmp_path / "client.toml"
    settings.write_text("minimal = true\n")
    created = client(
        stack, tmp_path, "batch", "--core", str(main.coredump), "--status-delay", "0.2",
        "--executable", main.executable, "--package", main.package,
        env={"RETRACE_CLIENT_CONFIG": str(settings)},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "minimal core: " in created.stderr
    assert f"{main.local_name} = {main.local_value}" in created.stdout

    # A crash systemd-coredump kept (a stand-in coredumpctl, as in test_client.py).
    journal = tmp_path / "journal.json"
    journal.write_text(
        json.dumps(
            {
                "COREDUMP_PID": "4242",
                "COREDUMP_EXE": main.executable,
                "COREDUMP_PACKAGE_NAME": "crasher",
                "COREDUMP_PACKAGE_VERSION": "1.0-1.fc40",
                "COREDUMP_FILENAME": str(main.coredump),
            }
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "coredumpctl"
    source = (STAND_INS / "coredumpctl").read_text().split("\n", 1)[1]
    stand_in.write_text(f"#!{sys.executable}\n{source}")
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_COREDUMP_JOURNAL": str(journal)}
    dumped = client(
        stack, tmp_path, "batch", "--coredumpctl", "4242", "--status-delay", "0.2", "--minimal",
        env=env,
    )  # fmt: skip
    assert dumped.returncode == 0, dumped.stderr
    assert "minimal core: " in dumped.stderr
    assert f"in {main.function} (" in dumped.stdout
