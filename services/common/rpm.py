"""Reading RPM headers with the ``rpm`` tool: the NEVRA, the files and their build-ids."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.runner import run
from services.common.store import BuildIdKind, Nevra

RPM_TIMEOUT = 120

_QUERY = (
    "%{NAME}\\n%{EPOCHNUM}\\n%{VERSION}\\n%{RELEASE}\\n%{ARCH}\\n%{SOURCERPM}\\n"
    "[%{FILENAMES}\\t%{FILELINKTOS}\\n]"
)
_BUILD_ID_ENTRY = re.compile(
    r"^/usr/lib(?P<debug>/debug)?/\.build-id/(?P<head>[0-9a-f]{2})/(?P<tail>[0-9a-f]{6,})"
    r"(?P<suffix>\.debug)?$"
)
_DIST = re.compile(r"\.fc(?P<version>\d+)(?:[._~^]|$)")


class RpmError(ValueError):
    """The file is not an RPM this project can use; the message names it."""


@dataclass(frozen=True)
class RpmHeader:
    """What the mirror needs from an RPM's header."""

    nevra: Nevra
    source: bool
    files: tuple[str, ...]
    build_ids: tuple[tuple[str, BuildIdKind, str], ...]
    """``(build_id, kind, path of the real file)`` for every build-id entry."""


def read_header(path: Path) -> RpmHeader:
    """Query the header of the RPM at ``path``."""
    result = run(
        ["rpm", "-qp", "--nosignature", "--nodigest", "--queryformat", _QUERY, str(path)],
        timeout=RPM_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RpmError(f"{path.name} is not a readable RPM: {result.stderr.strip()}")
    lines = result.stdout.split("\n")
    name, epoch, version, release, arch, sourcerpm = lines[:6]
    files: list[str] = []
    entries: list[tuple[str, BuildIdKind, str]] = []
    for line in lines[6:]:
        if not line:
            continue
        filename, _, target = line.partition("\t")
        files.append(filename)
        entry = _build_id_entry(filename, target)
        if entry is not None:
            entries.append(entry)
    return RpmHeader(
        nevra=Nevra(name, int(epoch), version, release, arch),
        source=sourcerpm in ("", "(none)"),
        files=tuple(files),
        build_ids=tuple(entries),
    )


def _build_id_entry(filename: str, target: str) -> tuple[str, BuildIdKind, str] | None:
    match = _BUILD_ID_ENTRY.match(filename)
    if match is None:
        return None
    is_debug = bool(match["debug"])
    # Under /usr/lib/debug, "<id>.debug" names the debug file; "<id>" alone links back
    # to the binary in another package.  Under /usr/lib, "<id>" names the binary.
    if is_debug != bool(match["suffix"]):
        return None
    build_id = match["head"] + match["tail"]
    real = (
        posixpath.normpath(posixpath.join(posixpath.dirname(filename), target))
        if target
        else filename
    )
    return build_id, BuildIdKind.DEBUG if is_debug else BuildIdKind.BINARY, real


def os_release_of(release: str) -> str | None:
    """The OS release a package was built for, from its dist tag: ``1.fc40`` → ``fedora-40``."""
    match = _DIST.search(release)
    return f"fedora-{match['version']}" if match else None
