"""What an RPM's header says about build-ids and releases.

The header's ``.build-id`` links are the index's second source: the first is the
ELF files themselves (:mod:`services.mirror.index`).  A link is all the mirror
knows of an RPM whose payload it has not read.
"""

from __future__ import annotations

import re

from services.common.data.mirror import BuildIdKind, IndexEntry, IndexSource
from services.common.rpmfile import PayloadError, RpmHeader, resolve_link

_BUILD_ID_ENTRY = re.compile(
    r"^/usr/lib(?P<debug>/debug)?/\.build-id/(?P<head>[0-9a-f]{2})/(?P<tail>[0-9a-f]{6,})"
    r"(?P<suffix>\.debug)?$"
)
_DIST = re.compile(r"\.fc(?P<version>\d+)(?:[._~^]|$)")


class RpmError(PayloadError):
    """The file is not an RPM this project can use; the message names it."""


def header_entries(header: RpmHeader) -> list[IndexEntry]:
    """The build-id entries the header's ``.build-id`` links spell."""
    entries = []
    for filename, target in zip(header.files, header.link_targets, strict=True):
        entry = build_id_entry(filename, target)
        if entry is not None:
            entries.append(entry)
    return entries


def build_id_entry(filename: str, target: str) -> IndexEntry | None:
    """The index entry a ``.build-id`` link at ``filename`` to ``target`` spells, if any.

    Under /usr/lib/debug, ``<id>.debug`` names the debug file and ``<id>`` alone
    links back to the binary's path (in another package of the build); under
    /usr/lib, ``<id>`` names the binary.
    """
    match = _BUILD_ID_ENTRY.match(filename)
    if match is None:
        return None
    is_debug = bool(match["debug"])
    if not is_debug and match["suffix"]:
        return None
    build_id = match["head"] + match["tail"]
    real = resolve_link(filename, target) if target else filename
    if not is_debug:
        kind = BuildIdKind.BINARY
    elif match["suffix"]:
        kind = BuildIdKind.DEBUG
    elif target and not real.startswith("/usr/lib/.build-id/"):
        kind = BuildIdKind.BINARY_PATH
    else:
        # Fedora's default layout links to the main package's link, which says nothing
        # of where the binary is.
        return None
    return IndexEntry(build_id, kind, real, IndexSource.HEADER)


def os_release_of(release: str) -> str | None:
    """The OS release a package was built for, from its dist tag: ``1.fc40`` → ``fedora-40``."""
    match = _DIST.search(release)
    return f"fedora-{match['version']}" if match else None
