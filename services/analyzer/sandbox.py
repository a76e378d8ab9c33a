"""Where gdb runs: a bubblewrap sandbox, because a core dump is untrusted input.

Inside the sandbox gdb sees the host's ``/usr`` read-only (its own binary, its
libraries and its data directory), the task's root read-only at the fixed path
:data:`ROOT`, the core at :data:`CORE`, our gdb script at :data:`SCRIPT`, and
nothing else: no network, a private ``/tmp``, an empty ``/usr/lib/debug`` so the
host's debug files can never serve a frame, new user, PID, IPC and UTS
namespaces with an unprivileged uid, and a limit on its address space.  The
runner kills the whole process group at the timeout; bwrap's PID namespace takes
every process inside with it.

Where user namespaces are unavailable the operator must choose the ``none`` mode
in the settings; the analyzer never drops the sandbox on its own.
"""

from __future__ import annotations

import resource
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from services.common.elf import NotElf, open_elf
from services.common.runner import CommandError, run

# Fixed paths inside the sandbox; gdb's output is mapped back from these.
ROOT = Path("/retrace/root")
CORE = Path("/retrace/core")
SCRIPT_DIR = Path("/retrace/lib")
# Where a host tool that must not see the host's files by a core's paths finds /usr.
HOST_USR = Path("/retrace/host/usr")

# An unprivileged uid and gid inside the user namespace: "nobody".
UID = GID = 65534
# The sandbox's own private /tmp (a fresh tmpfs), not the host's.
PRIVATE_TMP = "/tmp"  # noqa: S108
TMP_SIZE = 64 << 20
CHECK_TIMEOUT = 30


class SandboxMode(StrEnum):
    """How gdb is confined; only an operator's setting ever chooses ``none``."""

    BWRAP = "bwrap"
    NONE = "none"


class SandboxUnavailable(Exception):
    """The configured sandbox cannot run on this host; the message says what to do."""


@dataclass(frozen=True)
class Placement:
    """Where gdb finds the root, the core and our script, as paths it can open."""

    root: Path
    core: Path
    script: Path


@dataclass(frozen=True)
class Sandbox:
    """Wraps gdb's command line in the configured sandbox."""

    mode: SandboxMode
    memory_limit_mib: int
    bwrap: str = "bwrap"

    def placement(self, root: Path, core: Path, script: Path) -> Placement:
        """The paths gdb must be given for a task whose files are at these host paths."""
        if self.mode == SandboxMode.NONE:
            return Placement(root, core, script)
        return Placement(ROOT, CORE, SCRIPT_DIR / script.name)

    def wrap(self, argv: list[str], root: Path, core: Path, script: Path) -> list[str]:
        """``argv`` (a command using :meth:`placement`'s paths) as run in the sandbox."""
        if self.mode == SandboxMode.NONE:
            return argv
        inside = self.placement(root, core, script)
        # A gdb installed outside /usr (an operator's own build) is bound read-only too.
        program = Path(argv[0])
        own = ["--ro-bind", str(program), str(program)]
        if not program.is_absolute() or program.is_relative_to("/usr"):
            own = []
        return [
            self.bwrap,
            "--unshare-all",  # pid, net, ipc, uts and cgroup namespaces
            "--unshare-user",
            "--uid", str(UID), "--gid", str(GID),
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop", "ALL",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin",
            "--setenv", "HOME", PRIVATE_TMP,
            "--setenv", "LC_ALL", "C.UTF-8",
            # gdb itself, read-only; merged-/usr links so its loader path resolves.
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin",
            "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
            # The host's debug files must never serve a frame.
            "--tmpfs", "/usr/lib/debug",
            "--remount-ro", "/usr/lib/debug",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(TMP_SIZE), "--tmpfs", PRIVATE_TMP,
            "--ro-bind", str(root), str(inside.root),
            "--ro-bind", str(core), str(inside.core),
            "--ro-bind", str(script), str(inside.script),
            *own,
            "--remount-ro", "/",
            "--chdir", PRIVATE_TMP,
            "--",
            *argv,
        ]  # fmt: skip

    def wrap_tool(self, tool: str, args: list[str], core: Path) -> tuple[list[str], Path]:
        """A host tool reading only ``core``: no path the core names resolves to a host file.

        The host's ``/usr`` is mounted away from ``/usr`` and the tool is started
        through its dynamic loader, so a core that records ``/usr/lib64/libc.so.6``
        never leads the tool to the analyzer host's libc.  Returns the command and
        the core's path as the tool sees it.
        """
        program = Path(shutil.which(tool) or tool).resolve()
        if self.mode == SandboxMode.NONE:
            return [str(program), *args], core
        loader = _interpreter(program).resolve()
        if not (program.is_relative_to("/usr") and loader.is_relative_to("/usr")):
            raise SandboxUnavailable(f"{program} or its loader {loader} is not under /usr")

        def moved(path: Path) -> str:
            return str(HOST_USR / path.relative_to("/usr"))

        argv = [
            self.bwrap,
            "--unshare-all", "--unshare-user",
            "--uid", str(UID), "--gid", str(GID),
            "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", "--setenv", "LC_ALL", "C",
            "--ro-bind", "/usr", str(HOST_USR),
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(TMP_SIZE), "--tmpfs", PRIVATE_TMP,
            "--ro-bind", str(core), str(CORE),
            "--remount-ro", "/",
            "--",
            moved(loader), "--library-path", moved(loader.parent), moved(program),
            *args,
        ]  # fmt: skip
        return argv, CORE

    def limits(self) -> None:
        """Resource limits, applied in the child between fork and exec."""
        limit = self.memory_limit_mib << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing gdb leaves no core

    def check(self) -> None:
        """Raise :class:`SandboxUnavailable` unless the sandbox starts on this host."""
        if self.mode == SandboxMode.NONE:
            return
        probe = Path("/dev/null")  # any file will do for the binds
        argv = self.wrap(["/usr/bin/true"], Path("/usr/share"), probe, probe)
        try:
            run(argv, timeout=CHECK_TIMEOUT)
        except CommandError as exc:
            raise SandboxUnavailable(
                f"the bubblewrap sandbox for gdb cannot start here ({exc}); enable user "
                'namespaces, or set [analyzer] sandbox = "none" to run gdb unconfined '
                "knowingly"
            ) from exc


def _interpreter(program: Path) -> Path:
    """The dynamic loader an ELF program names (its ``PT_INTERP``)."""
    try:
        loader = open_elf(program).interpreter()
    except NotElf as exc:
        raise SandboxUnavailable(f"{program} is not an ELF program") from exc
    if loader is None:
        raise SandboxUnavailable(f"{program} names no dynamic loader")
    return Path(loader)
