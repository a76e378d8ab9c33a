"""Step 1: what the core holds -- its modules and their build-ids (``eu-unstrip -n``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.analyzer.sandbox import Sandbox, SandboxUnavailable
from services.common.elf import NotElf, open_elf
from services.common.runner import CommandError, run

EU_UNSTRIP_TIMEOUT = 120
# The note retrace-client adds to a minimal core (README, client section).
MINIMAL_NOTE = (b"RETRACE", 0x4E494D52)  # (name, type)

# START+SIZE BUILDID@ADDR FILE DEBUGFILE MODULENAME
_LINE = re.compile(
    r"^0x(?P<start>[0-9a-f]+)\+0x(?P<size>[0-9a-f]+)\s+"
    r"(?:(?P<build_id>[0-9a-f]+)@0x[0-9a-f]+|-)\s+(?P<file>\S+)\s+\S+\s+(?P<name>.+)$"
)


class CoreError(Exception):
    """The core dump cannot be read; the message says why, for the task log."""


@dataclass(frozen=True)
class Module:
    """One mapped ELF module of the crashed process."""

    start: int
    size: int
    build_id: str | None
    name: str

    @property
    def is_vdso(self) -> bool:
        """The kernel's vDSO has a build-id but no package."""
        return self.name.startswith(("linux-vdso", "linux-gate", "[vdso"))


def check_complete(core: Path) -> None:
    """Raise :class:`CoreError` when the core is shorter than its headers describe."""
    # A core shorter than its program headers say was cut off on its way here; gdb
    # would read zeros or garbage for the missing memory and print a plausible but
    # wrong backtrace.
    try:
        expected = open_elf(core).described_size()
    except NotElf as exc:
        raise CoreError("the core dump is not an ELF file") from exc
    actual = core.stat().st_size
    if actual < expected:
        raise CoreError(
            f"the core dump is truncated: it has {actual} bytes of the {expected} "
            "its headers describe"
        )


@dataclass(frozen=True)
class Dropped:
    """A range of memory a minimal core lacks, and the client's reason."""

    start: int
    end: int
    why: str


@dataclass(frozen=True)
class MinimalCore:
    """What the client's note says of a minimal core."""

    full_size: int
    red_zone: int
    max_anonymous: int
    environment_blanked: bool
    dropped: tuple[Dropped, ...]


def minimal_note(core: Path) -> MinimalCore | None:
    """The client's note of a minimal core; None for a core without one.

    Raises :class:`CoreError` for a note that does not read as the README says.
    """
    try:
        notes = list(open_elf(core).segment_notes())
    except NotElf as exc:
        raise CoreError("the core dump is not an ELF file") from exc
    found = [desc for kind, name, desc in notes if (name, kind) == MINIMAL_NOTE]
    if not found:
        return None
    try:
        note = json.loads(found[0])
        return MinimalCore(
            full_size=int(note["full_size"]),
            red_zone=int(note["red_zone"]),
            max_anonymous=int(note["max_anonymous"]),
            environment_blanked=bool(note.get("environment_blanked")),
            dropped=tuple(
                Dropped(
                    int(d["start"], 16), int(d["end"], 16), " ".join(str(d["why"]).split())[:200]
                )
                for d in note["dropped"]
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CoreError(f"the core's minimal-core note does not read: {exc}") from exc


def _recorded_path(file: str, name: str) -> str:
    # When eu-unstrip found a file by the path the core records, it prints that path
    # in FILE and only the soname in MODULENAME; otherwise MODULENAME is the path.
    if not name.startswith("/") and file.startswith("/"):
        return file
    return name


def read_modules(core: Path, sandbox: Sandbox) -> list[Module]:
    """Every module mapped in ``core``, in address order.

    Build-ids come from the core alone: in the sandbox, a path the core records
    never leads ``eu-unstrip`` to the analyzer host's own file of that name.
    """
    try:
        argv, seen = sandbox.wrap_tool("eu-unstrip", ["-n"], core)
        result = run([*argv, f"--core={seen}"], timeout=EU_UNSTRIP_TIMEOUT)
    except SandboxUnavailable as exc:
        raise CoreError(f"the core dump cannot be read here: {exc}") from exc
    except CommandError as exc:
        raise CoreError(f"the core dump cannot be read: {exc}") from exc
    modules = []
    for line in result.stdout.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        modules.append(
            Module(
                start=int(match["start"], 16),
                size=int(match["size"], 16),
                build_id=match["build_id"],
                name=_recorded_path(match["file"], match["name"]),
            )
        )
    if not modules:
        raise CoreError("the core dump lists no modules")
    return sorted(modules, key=lambda m: m.start)
