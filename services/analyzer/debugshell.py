"""Debug tasks: the exact package set is kept, and ``retrace-analyzer shell`` reopens it.

A debug task (``X-Task-Type: 1``) keeps its core when it ends, and the analyzer
writes ``debug-manifest.json`` beside it: every package of the root, by NEVRA and
content digest, and of a package the root took only some files of, those files.
``retrace-analyzer shell TASK`` assembles that same root again
from the cache (unpacking what was evicted meanwhile) and opens gdb on the core
interactively, in the same sandbox as a retrace.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from services.analyzer.gdb import REPORT_SCRIPT, gdb_argv
from services.analyzer.rootcache import Only, RootCache, WorkFolders
from services.analyzer.sandbox import Sandbox
from services.common.data.mirror import Nevra, Package

MANIFEST = "debug-manifest.json"


class ShellError(Exception):
    """The debug shell cannot be opened; the message says why."""


def write_manifest(
    path: Path, executable: str, arch: str, packages: list[Package], only: Only
) -> None:
    """Record the exact package set of a debug task's root, and what it took of each."""
    document: dict[str, Any] = {
        "executable": executable,
        "arch": arch,
        "packages": [
            {
                "id": p.id,
                "name": p.nevra.name,
                "epoch": p.nevra.epoch,
                "version": p.nevra.version,
                "release": p.nevra.release,
                "arch": p.nevra.arch,
                "nevra": str(p.nevra),
                "os_release": p.os_release,
                "path": p.path,
                "sha256": p.sha256,
                "size": p.size,
                **({"only": sorted(only[p.sha256])} if p.sha256 in only else {}),
            }
            for p in packages
        ],
    }
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def read_manifest(path: Path) -> tuple[str, list[Package], Only]:
    """The executable, packages and files taken of some of them, as a debug task's
    manifest records them."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ShellError(
            f"{path} does not exist: the task is not a debug task, or it ended before its "
            "packages were known"
        ) from exc
    packages = [
        Package(
            id=item["id"],
            nevra=Nevra(
                item["name"], item["epoch"], item["version"], item["release"], item["arch"]
            ),
            os_release=item["os_release"],
            path=item["path"],
            sha256=item["sha256"],
            size=item["size"],
        )
        for item in document["packages"]
    ]
    only = {
        item["sha256"]: frozenset(item["only"]) for item in document["packages"] if "only" in item
    }
    return str(document["executable"]), packages, only


def open_shell(
    task_dir: Path, cache: RootCache, sandbox: Sandbox, gdb: str, work_root: Path
) -> int:
    """Rebuild the task's root and run gdb on its core on this terminal; gdb's exit status."""
    executable, packages, only = read_manifest(task_dir / MANIFEST)
    core = task_dir / "crash" / "coredump"
    if not core.is_file():
        raise ShellError(f"{core} is gone: only debug tasks keep their core")
    # Held like an analyzer's work folder: an analyzer starting meanwhile leaves it be.
    with WorkFolders(work_root).held("shell") as work:
        root = work / "root"
        with cache.lease(packages):
            for warning in cache.assemble(packages, root, only):
                print(f"warning: {warning}")
            inside = sandbox.placement(root, core, REPORT_SCRIPT)
            argv = gdb_argv(
                gdb,
                inside.root,
                inside.root / executable.lstrip("/"),
                inside.core,
                inside.script,
                interactive=True,
            )
            # The operator's own terminal session: no timeout and no captured output,
            # so not the runner; the sandbox and its limits are the same as a retrace's.
            done = subprocess.run(
                sandbox.wrap(argv, root, core, REPORT_SCRIPT),
                check=False,
                preexec_fn=sandbox.limits,
            )
            return done.returncode
