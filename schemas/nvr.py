"""Package and build names: ``NAME-[EPOCH:]VERSION-RELEASE[.ARCH]``, parsed one way.

Every part that reads an NVR — the intake's upload check and ``/checkpackage``,
the analyzer's hints and shared-DWARF names, the mirror's dead letters and these
messages — parses it here.  An architecture suffix is taken off only when it is
one of the architectures RPM builds for, so a release such as ``1.fc40`` is never
mistaken for ``1`` plus an arch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHES = (
    "x86_64", "aarch64", "ppc64le", "ppc64", "s390x", "i686", "i386", "armv7hl", "riscv64",
    "noarch", "src",
)  # fmt: skip
"""Architectures an NEVRA may end in."""
_NVR = re.compile(
    r"^(?P<name>[^\s/]+)-(?:(?P<epoch>\d+):)?(?P<version>[^-\s/:]+)-(?P<release>[^-\s/:]+)$"
)
MAX_LENGTH = 512


@dataclass(frozen=True)
class Nvr:
    """A name, an optional epoch, a version and a release (and an arch, if one was given)."""

    name: str
    version: str
    release: str
    epoch: int | None = None
    arch: str | None = None

    def __str__(self) -> str:
        """``NAME-VERSION-RELEASE``: how Koji names a build (no epoch, no arch)."""
        return f"{self.name}-{self.version}-{self.release}"


def parse_nvr(text: str) -> Nvr | None:
    """``NAME-[EPOCH:]VERSION-RELEASE[.ARCH]`` as an :class:`Nvr`; ``None`` if it is not one."""
    text = text.strip()
    if not text or len(text) > MAX_LENGTH:
        return None
    arch = None
    stem, dot, suffix = text.rpartition(".")
    if dot and suffix in ARCHES and stem.count("-") >= 2:
        text, arch = stem, suffix
    match = _NVR.match(text)
    if match is None:
        return None
    epoch = match["epoch"]
    return Nvr(
        match["name"],
        match["version"],
        match["release"],
        int(epoch) if epoch is not None else None,
        arch,
    )
