"""The mirror's dead-letter consumer: mirror commands the broker gave up on fail their builds.

A mirror command lands in ``retrace.dead-letter.mirror.build`` when the command
queue's policy dead-letters it: after the delivery limit (workers kept dying on
it) or at once when a worker rejected it (unreadable, or a build Koji does not
have).  The build is recorded as ``failed`` with the reason from ``x-death``, so
``/metrics`` and the store show it instead of the build silently never arriving.
A worker that gives up on a command itself (its downloads kept being bad, an
unexpected error on every delivery) sends it here with its own reason in the
:data:`REASON_HEADER` header, which is recorded instead.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from schemas.nvr import parse_nvr
from services.common.bus import death_reason
from services.common.data.mirror import KojiBuild, MirrorData, SyncState
from services.mirror.koji import KojiError, KojiHub, KojiUnavailable

log = logging.getLogger(__name__)

FAILED = SyncState.FAILED
"""The ``koji_builds`` state of a build whose mirror command was dead-lettered."""

REASON_HEADER = "x-retrace-reason"
"""The reason a worker that dead-lettered a command itself gave."""

_WHY = {
    "delivery_limit": "the mirror command was given up after its worker stopped on every attempt",
    "rejected": "the mirror command was refused (unreadable, or a build Koji does not have)",
    "expired": "the mirror command expired before a worker took it",
    "maxlen": "the mirror queue was full",
}


def mirror_death_reason(headers: dict[str, Any]) -> str:
    """One plain sentence from a dead-lettered mirror command's headers: the worker's own
    reason if it gave one, else the broker's from ``x-death``."""
    own = headers.get(REASON_HEADER)
    if isinstance(own, bytes):
        own = own.decode(errors="replace")
    if isinstance(own, str) and own:
        return own
    return death_reason(headers, _WHY, "the broker dead-lettered the mirror command")


def build_ref_of(body: bytes) -> int | str | None:
    """The Koji build (id or NVR) a dead-lettered body names, if it names one plainly."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    ref = data.get("build") if isinstance(data, dict) else None
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int) and ref > 0:
        return ref
    if isinstance(ref, str) and parse_nvr(ref) is not None:
        return ref
    return None


class MirrorDeadLetters:
    """Records the build of one dead-lettered mirror command as failed."""

    def __init__(self, data: MirrorData, koji: KojiHub) -> None:
        self._data = data
        self._koji = koji

    def __call__(self, body: bytes, headers: dict[str, Any]) -> None:
        reason = mirror_death_reason(headers)
        ref = build_ref_of(body)
        if ref is None:
            log.error("dropping a dead-lettered mirror command that names no build: %s", reason)
            return
        known = self._data.get_build(ref) if isinstance(ref, int) else self._data.find_build(ref)
        if known is not None and known.state == SyncState.MIRRORED:
            # The files are in place from an earlier command; a later one dying changes nothing.
            log.warning(
                "dead-lettered mirror command for build %s, already mirrored: %s", known.nvr, reason
            )
            return
        if known is None:
            known = self._from_koji(ref)
        if known is None:
            log.error(
                "dead-lettered mirror command for build %r, which neither the mirror nor Koji "
                "knows: %s",
                ref,
                reason,
            )
            return
        self._data.record_build(
            known.id, known.nvr, known.os_release, FAILED, reason, known.completed_at
        )
        log.error("mirroring build %s (%d) failed: %s", known.nvr, known.id, reason)

    def _from_koji(self, ref: int | str) -> KojiBuild | None:
        # A build the mirror never recorded (the worker died before it could): Koji names it.
        try:
            info = self._koji.build(ref)
        except (KojiUnavailable, KojiError) as exc:
            log.warning("cannot ask Koji about dead-lettered build %r: %s", ref, exc)
            return None
        if info is None:
            return None
        return KojiBuild(
            info.id, info.nvr, None, FAILED, None, info.completed_at, datetime.now(UTC)
        )
