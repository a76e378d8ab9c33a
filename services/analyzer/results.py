"""Step 5: ``backtrace.json``, the crash as programs read it.

gdb says which frames it found (``gdb_report.py``); the core's module list says
where each module was loaded and its build-id; the resolution says which
package served each module.  This joins the three.  ``symbolized`` is true when
gdb had debug information for the frame (a source file and line); a frame
without it may still carry a function name from the dynamic symbol table.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from schemas.messages import TaskFinishedV1, TaskType
from schemas.topology import TASK_FINISHED
from services.analyzer.coredump import Module
from services.analyzer.retrace import Retrace
from services.common.bus import Publish
from services.common.spool import Spool

FORMAT = 1


def _signal(number: Any) -> dict[str, Any] | None:
    if not isinstance(number, int):
        return None
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = None
    return {"number": number, "name": name}


def _module_at(modules: list[Module], address: int) -> Module | None:
    for module in modules:
        if module.start <= address < module.start + module.size:
            return module
    return None


def _frame(index: int, raw: dict[str, Any], modules: list[Module]) -> dict[str, Any]:
    address = raw.get("address")
    if not isinstance(address, int):
        return {"index": index, "error": raw.get("error", "gdb could not read this frame")}
    module = _module_at(modules, address)
    return {
        "index": index,
        "address": f"{address:#x}",
        "function": raw.get("function"),
        "file": raw.get("file"),
        "line": raw.get("line"),
        "module": module.name if module else raw.get("module"),
        "build_id": module.build_id if module else None,
        "offset": f"{address - module.start:#x}" if module else None,
        "symbolized": raw.get("line") is not None,
    }


def backtrace_json(task_id: str, outcome: Retrace) -> str:
    """The ``backtrace.json`` result of a successful retrace."""
    report = outcome.gdb.report
    modules = [served.module for served in outcome.resolution.served]
    crashing = report.get("crashing_thread")
    threads = [
        {
            "number": thread.get("number"),
            "lwp": thread.get("lwp"),
            "crashing": thread.get("number") == crashing,
            "truncated": bool(thread.get("truncated")),
            "frames": [
                _frame(index, raw, modules) for index, raw in enumerate(thread.get("frames", []))
            ],
        }
        for thread in report.get("threads", [])
    ]
    document = {
        "format": FORMAT,
        "task_id": task_id,
        "signal": _signal(report.get("signal")),
        "crashing_thread": crashing,
        "crash_function": outcome.gdb.crash_function,
        "crash_module": outcome.gdb.crash_module,
        "threads": threads,
        "modules": [
            {
                "path": served.module.name,
                "build_id": served.module.build_id,
                "start": f"{served.module.start:#x}",
                "size": served.module.size,
                "vdso": served.module.is_vdso,
                "found": served.binary is not None,
                "package": str(served.binary.nevra) if served.binary else None,
                "debuginfo_found": served.debug is not None,
                "debuginfo_package": str(served.debug.nevra) if served.debug else None,
            }
            for served in outcome.resolution.served
        ],
        "packages": [str(package.nevra) for package in outcome.resolution.packages],
    }
    return json.dumps(document, indent=1) + "\n"


def announce_finished(
    publish: Publish, event: TaskFinishedV1, spool: Spool, task_type: str
) -> None:
    """Publish ``event`` of a task now final, then delete its core unless a debug task
    keeps it.

    The event goes first, so that whoever waits learns at once: unlinking a 100 MB
    core takes some disks tens of milliseconds.
    """
    try:
        publish(TASK_FINISHED, event, None)
    finally:
        if task_type != TaskType.DEBUG:
            (spool.crash_dir(event.task_id) / "coredump").unlink(missing_ok=True)
