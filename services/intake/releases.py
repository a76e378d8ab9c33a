"""Release strings as ABRT's client spells them: ``fedora-40-x86_64``.

abrt-retrace-client builds its own string from the crashed machine's os-release and
architecture -- ``<os>-<version>-<arch>``, with Rawhide's version spelled ``rawhide``
and i686 spelled ``i386`` -- and goes on only if it finds that string among the first
32 words of ``supported_releases`` in ``GET /settings``.  It sends the same string as
``X-OS-Release`` to ``GET /checkpackage``.  The store names releases by their dist
tag (``fedora-40``) and architectures as RPM does (``i686``); this module translates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_RELEASES = 32
"""The client reads no more words of ``supported_releases`` (the 32nd takes the rest)."""

RAWHIDE = "rawhide"

# 32-bit x86: the client says i386 for any of them; RPMs of such a machine are i686.
_X86_32 = ("i386", "i486", "i586", "i686")

_CLIENT_RELEASE = re.compile(
    r"^(?P<os>[a-z][a-z0-9_.]*)-(?P<version>[a-z0-9_.]+)-(?P<arch>[a-z0-9_]+)$"
)
_OS_RELEASE = re.compile(r"^(?P<os>[a-z][a-z0-9_.]*)-(?P<version>[a-z0-9_.]+)$")


def client_arch(arch: str) -> str:
    """An architecture as the client spells it in its release string (i686 → i386)."""
    return "i386" if arch in _X86_32 else arch


def machine_arch(arch: str) -> str:
    """The architecture of a core dump (as the intake's ``arches`` name it) of a machine
    whose release string says ``arch`` (i386 → i686)."""
    return "i686" if arch in _X86_32 else arch


def package_arches(arch: str) -> frozenset[str] | None:
    """The package architectures that satisfy ``X-Package-Arch: arch``: the same family
    (i386 to i686 are one) and noarch; ``None`` (any) for noarch itself."""
    if arch == "noarch":
        return None
    family = _X86_32 if arch in _X86_32 else (arch,)
    return frozenset((*family, "noarch"))


def fedora_version(os_release: str) -> int | None:
    """The version of a Fedora release (``fedora-40`` → 40), else ``None``."""
    match = _OS_RELEASE.match(os_release)
    if match is None or match["os"] != "fedora" or not match["version"].isdigit():
        return None
    return int(match["version"])


def spell(os_release: str, arch: str, rawhide: int) -> str:
    """The client's string for ``os_release`` on ``arch``.

    ``rawhide`` is Rawhide's current Fedora version (0: none); Fedora releases at or
    above it are spelled ``rawhide``, as a Rawhide machine calls itself.
    """
    version = fedora_version(os_release)
    if rawhide and version is not None and version >= rawhide:
        os_release = f"fedora-{RAWHIDE}"
    return f"{os_release}-{client_arch(arch)}"


def _newest_first(spelled: str) -> tuple[bool, tuple[int, ...], str, bool, str]:
    os_release, _, arch = spelled.rpartition("-")
    os_name, _, version = os_release.partition("-")
    numbers = tuple(-int(part) for part in version.split(".")) if _numeric(version) else ()
    # Rawhide first, then numbered versions newest first, then any other spelling;
    # within a release x86_64 first.
    return (version != RAWHIDE, numbers or (1,), os_name, arch != "x86_64", arch)


def _numeric(version: str) -> bool:
    return all(part.isdigit() for part in version.split("."))


def supported(pairs: Iterable[tuple[str, str]], rawhide: int) -> list[str]:
    """``supported_releases``: every ``(os_release, arch)`` spelled as the client spells
    it, once, newest first, at most :data:`MAX_RELEASES` (the oldest are left out)."""
    spelled = {spell(os_release, arch, rawhide) for os_release, arch in pairs}
    return sorted(spelled, key=_newest_first)[:MAX_RELEASES]


@dataclass(frozen=True)
class ClientRelease:
    """An ``X-OS-Release`` header: ``fedora-40-i386`` or ``fedora-rawhide-x86_64``."""

    os: str
    version: str
    arch: str

    @classmethod
    def parse(cls, text: str) -> ClientRelease | None:
        """The release ``text`` names, or ``None`` if it is not ``<os>-<version>-<arch>``."""
        match = _CLIENT_RELEASE.match(text.strip().lower())
        if match is None:
            return None
        return cls(match["os"], match["version"], match["arch"])

    def os_releases(self, known: Iterable[str], rawhide: int) -> set[str]:
        """The store's names of this release: ``fedora-40``; for Rawhide, every known
        Fedora release at or above ``rawhide`` (none when ``rawhide`` is 0)."""
        if self.os == "fedora" and self.version == RAWHIDE:
            if not rawhide:
                return set()
            return {r for r in known if (fedora_version(r) or 0) >= rawhide}
        return {f"{self.os}-{self.version}"}

    def __str__(self) -> str:
        return f"{self.os}-{self.version}-{self.arch}"
