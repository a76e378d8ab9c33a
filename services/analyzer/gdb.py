"""Step 4: run gdb on the core against the task's root, and read what it said.

gdb sees only the root: ``sysroot`` and ``debug-file-directory`` point into it,
debuginfod is off, auto-loading is confined to it, and no init file is read.
Nothing from the crash directory reaches a gdb command line: the executable and
the core are passed as file arguments, never inside a command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from services.common.runner import CommandError, run

# The original Retrace Server's gdb session, in its order.
COMMANDS = (
    "thread apply all -ascending backtrace full 2048",
    "info sharedlib",
    "print (char*)__abort_msg",
    "print (char*)__glib_assert_msg",
    "info registers",
    "disassemble",
)
# After the original's output, a marked section of our own, cut from the backtrace.
MARK = "--- retrace-server: crash location ---"

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
    """What the gdb session produced."""

    backtrace: str
    stderr: str
    crash_function: str | None
    crash_module: str | None
    seconds: float


@cache
def gdb_version(gdb: str) -> str:
    """The first line of ``gdb --version``."""
    return run([gdb, "--version"], timeout=30).stdout.splitlines()[0]


def gdb_argv(gdb: str, root: Path, executable: Path, core: Path) -> list[str]:
    """The gdb command line for a retrace in ``root``."""
    argv = [
        gdb,
        "-batch",
        "-nx",
        "-iex", "set debuginfod enabled off",
        "-iex", f"set sysroot {root}",
        "-iex", f"set debug-file-directory {root}/usr/lib/debug",
        "-iex", f"set auto-load safe-path {root}",
        # libthread_db only from where the core's libc was loaded: inside the root.
        "-iex", "set libthread-db-search-path $pdir",
        "-iex", "set width 0",
    ]  # fmt: skip
    for command in COMMANDS:
        argv += ["-ex", command]
    argv += ["-ex", f"echo \\n{MARK}\\n", "-ex", "info symbol $pc"]
    return [*argv, "--", str(executable), str(core)]


def run_gdb(gdb: str, root: Path, executable: Path, core: Path, timeout: float) -> GdbResult:
    """Run the retrace session; raise :class:`GdbError` when it yields no backtrace."""
    try:
        result = run(gdb_argv(gdb, root, executable, core), timeout=timeout, check=False)
    except CommandError as exc:
        raise GdbError(str(exc)) from exc
    # gdb shows files under the sysroot; the user knows them by their installed paths.
    output = result.stdout.replace(str(root), "")
    backtrace, _, location = output.partition(f"\n{MARK}\n")
    frame0 = _FRAME0.search(backtrace)
    if frame0 is None:
        detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise GdbError(f"gdb produced an unusable backtrace ({detail[0]})")
    symbol = _SYMBOL.search(location.strip())
    module = frame0["library"] or (
        symbol["module"] if symbol and symbol["module"] else str(executable).replace(str(root), "")
    )
    return GdbResult(
        backtrace=backtrace.rstrip("\n") + "\n",
        stderr=result.stderr.replace(str(root), ""),
        crash_function=frame0["function"],
        crash_module=module,
        seconds=result.seconds,
    )
