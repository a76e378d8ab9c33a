"""Runs inside gdb (``source`` it): prints the crash's threads and frames as JSON.

gdb loads this file from the analyzer's package, inside the sandbox, after the
original Retrace Server's commands.  It prints one marker line and then one line
of JSON; the analyzer adds what it knows better (modules, build-ids, packages).
It reads only what gdb already loaded and never runs a command built from the
crash's data.
"""

from __future__ import annotations

import json
from typing import Any

import gdb

MARK = "--- retrace-server: frames as JSON ---"
MAX_FRAMES = 2048


def _signal() -> int | None:
    try:
        return int(gdb.parse_and_eval("$_siginfo.si_signo"))
    except gdb.error:
        return None


def _frame(frame: Any) -> dict[str, Any]:
    pc = int(frame.pc())
    entry: dict[str, Any] = {
        "address": pc,
        "function": frame.name(),
        "file": None,
        "line": None,
        "module": gdb.solib_name(pc),
    }
    try:
        sal = frame.find_sal()
    except gdb.error:
        return entry
    if sal.symtab is not None:
        entry["file"] = sal.symtab.filename
        entry["line"] = sal.line or None
    return entry


def _frames() -> tuple[list[dict[str, Any]], bool]:
    frames: list[dict[str, Any]] = []
    try:
        frame = gdb.newest_frame()
        while frame is not None:
            if len(frames) == MAX_FRAMES:
                return frames, True
            frames.append(_frame(frame))
            frame = frame.older()
    except gdb.error as exc:
        if not frames:
            frames.append({"error": str(exc)})
    return frames, False


def report() -> dict[str, Any]:
    """Every thread's frames, innermost first, and which thread crashed."""
    crashing = gdb.selected_thread()
    threads = []
    for thread in sorted(gdb.selected_inferior().threads(), key=lambda t: t.num):
        thread.switch()
        frames, truncated = _frames()
        threads.append(
            {"number": thread.num, "lwp": thread.ptid[1], "frames": frames, "truncated": truncated}
        )
    if crashing is not None:
        crashing.switch()
    return {
        "signal": _signal(),
        "crashing_thread": crashing.num if crashing is not None else None,
        "threads": threads,
    }


print(MARK)
print(json.dumps(report()))
