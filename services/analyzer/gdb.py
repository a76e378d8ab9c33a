"""Step 4: run gdb on the core against the task's root, and read what it said.

gdb runs in the sandbox (``sandbox.py``) and sees only the root: ``sysroot`` and
``debug-file-directory`` point into it, debuginfod is off, auto-loading is confined
to it, and no init file is read.  Nothing from the crash directory reaches a gdb
command line: the executable and the core are passed as file arguments, never
inside a command.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from services.analyzer.sandbox import Sandbox, SandboxMode
from services.common.runner import CommandError, run

# The original Retrace Server's gdb session, in its order.
MAX_FRAMES = 2048  # a thread's frames beyond these are cut, and the result says so
COMMANDS = (
    f"thread apply all -ascending backtrace full {MAX_FRAMES}",
    "info sharedlib",
    "print (char*)__abort_msg",
    "print (char*)__glib_assert_msg",
    "info registers",
    "disassemble",
)
# After the original's output, marked sections of our own, cut from the backtrace.
MARK = "--- retrace-server: crash location ---"
# Shipped beside this module, run inside gdb: every thread's frames as JSON.
REPORT_SCRIPT = Path(__file__).with_name("gdb_report.py")
REPORT_MARK = "--- retrace-server: frames as JSON ---"

_FRAME0 = re.compile(
    r"^#0\s+(?:0x[0-9a-f]+ in )?(?P<function>[^\s(]+) \(.*?\)"
    r"(?: at (?P<file>\S+):(?P<line>\d+))?(?: from (?P<library>\S+))?$",
    re.MULTILINE,
)
_SYMBOL = re.compile(r" in section \S+(?: of (?P<module>\S+))?$")


class GdbError(Exception):
    """gdb failed, hung, or produced no usable backtrace."""


@dataclass(frozen=True)
class GdbResult:
    """What the gdb session produced, with paths shown as installed."""

    backtrace: str
    stderr: str
    crash_function: str | None
    crash_module: str | None
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


@cache
def gdb_version(gdb: str) -> str:
    """The first line of ``gdb --version``."""
    return run([gdb, "--version"], timeout=30).stdout.splitlines()[0]


def gdb_argv(
    gdb: str, root: Path, executable: Path, core: Path, script: Path, *, interactive: bool = False
) -> list[str]:
    """The gdb command line for a retrace in ``root`` (paths as gdb sees them).

    ``interactive`` leaves out the retrace's commands, for a person at a terminal.
    """
    argv = [
        gdb,
        "-quiet" if interactive else "-batch",
        "-nx",
        "-iex", "set debuginfod enabled off",
        "-iex", f"set sysroot {root}",
        "-iex", f"set debug-file-directory {root}/usr/lib/debug",
        "-iex", f"set auto-load safe-path {root}",
        # libthread_db only from where the core's libc was loaded: inside the root.
        "-iex", "set libthread-db-search-path $pdir",
        "-iex", "set width 0",
        "-iex", "set height 0",
    ]  # fmt: skip
    if interactive:
        return [*argv, "--", str(executable), str(core)]
    for command in COMMANDS:
        argv += ["-ex", command]
    argv += ["-ex", f"echo \\n{MARK}\\n", "-ex", "info symbol $pc"]
    argv += ["-ex", "echo \\n", "-ex", f"source {script}"]
    return [*argv, "--", str(executable), str(core)]


def run_gdb(
    gdb: str,
    sandbox: Sandbox,
    root: Path,
    executable: str,
    core: Path,
    timeout: float,
) -> GdbResult:
    """Run the retrace session; raise :class:`GdbError` when it yields no backtrace.

    ``executable`` is the crashed program's installed path, found under ``root``.
    """
    inside = sandbox.placement(root, core, REPORT_SCRIPT)
    argv = gdb_argv(
        gdb, inside.root, inside.root / executable.lstrip("/"), inside.core, inside.script
    )
    try:
        result = run(
            sandbox.wrap(argv, root, core, REPORT_SCRIPT),
            timeout=timeout,
            check=False,
            preexec=sandbox.limits,
        )
    except CommandError as exc:
        if "timed out" in str(exc):
            raise GdbError(f"gdb did not finish within {timeout:g} s and was killed") from exc
        raise GdbError(f"gdb could not start ({exc})") from exc
    # gdb shows files under the sysroot; the user knows them by their installed paths.
    shown = str(inside.root)
    output = result.stdout.replace(shown, "")
    output, _, report_text = output.partition(f"\n{REPORT_MARK}\n")
    backtrace, _, location = output.partition(f"\n{MARK}\n")
    frame0 = _FRAME0.search(backtrace)
    if frame0 is None:
        code = result.returncode
        if sandbox.mode == SandboxMode.BWRAP and 128 < code <= 128 + 64:
            code = 128 - code  # bwrap reports its child's death by signal N as 128 + N
        if code < 0:
            raise GdbError(f"{_exit(code)} before it printed a backtrace")
        detail = result.stderr.strip().splitlines()[-1:] or [_exit(code)]
        raise GdbError(f"gdb produced an unusable backtrace ({detail[0]})")
    symbol = _SYMBOL.search(location.strip())
    module = frame0["library"] or (symbol["module"] if symbol and symbol["module"] else executable)
    report: dict[str, Any] = {}
    if report_text.strip():
        try:
            report = json.loads(report_text.strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            report = {}
    return GdbResult(
        backtrace=backtrace.rstrip("\n") + "\n",
        stderr=result.stderr.replace(shown, ""),
        crash_function=frame0["function"],
        crash_module=module,
        seconds=result.seconds,
        report=report,
    )


def _exit(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"gdb was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"gdb was killed by signal {-code}"
