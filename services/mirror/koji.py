"""Koji, as the mirror sees it: builds, their RPMs, and where Koji keeps the files.

A thin layer over ``koji.ClientSession`` that turns Koji's answers into typed
records and its failures into two kinds: :class:`KojiUnavailable` (the hub or the
file server is down or failing: try again later) and :class:`KojiError` (Koji
answered, and the answer means this command can never succeed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import koji
import requests

log = logging.getLogger(__name__)


class BuildState(IntEnum):
    """Koji's build states."""

    BUILDING = 0
    COMPLETE = 1
    DELETED = 2
    FAILED = 3
    CANCELED = 4


class KojiUnavailable(Exception):
    """Koji cannot be reached or failed on its side; the same call may work later."""


class KojiError(Exception):
    """Koji refused the request (an unknown build, a bad argument)."""


@dataclass(frozen=True)
class KojiBuildInfo:
    """What the mirror needs of a build (``getBuild``)."""

    id: int
    name: str
    version: str
    release: str
    epoch: int | None
    state: BuildState
    volume_name: str | None
    completed_at: datetime | None
    raw: dict[str, Any]

    @property
    def nvr(self) -> str:
        """``name-version-release``."""
        return f"{self.name}-{self.version}-{self.release}"


@dataclass(frozen=True)
class KojiRpm:
    """One RPM of a build (``listRPMs``), with Koji's record of its content."""

    id: int
    name: str
    version: str
    release: str
    epoch: int | None
    arch: str
    size: int
    payloadhash: str
    raw: dict[str, Any]

    @property
    def filename(self) -> str:
        """The file name Koji gives it."""
        return f"{self.name}-{self.version}-{self.release}.{self.arch}.rpm"


def _timestamp(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    return datetime.fromtimestamp(float(value), UTC)


def _build(info: dict[str, Any]) -> KojiBuildInfo:
    return KojiBuildInfo(
        id=int(info["id"]),
        name=info["name"],
        version=info["version"],
        release=info["release"],
        epoch=info.get("epoch"),
        state=BuildState(int(info["state"])),
        volume_name=info.get("volume_name"),
        completed_at=_timestamp(info.get("completion_ts")),
        raw=info,
    )


class KojiHub:
    """The calls the mirror makes to a Koji hub, and the URLs of Koji's files."""

    def __init__(self, hub: str, topurl: str, timeout: int = 60) -> None:
        # Our own backoff (the wait queues) retries; koji's inner retry loop would
        # hold a worker for minutes on a hub that is down.
        self._session = koji.ClientSession(
            hub, {"anon_retry": False, "max_retries": 0, "retry_interval": 1, "timeout": timeout}
        )
        self.pathinfo = koji.PathInfo(topdir=topurl.rstrip("/"))
        self.timeout = timeout

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._session, method)(*args, **kwargs)
        except (koji.ServerOffline, koji.RetryError) as exc:
            raise KojiUnavailable(f"Koji is offline: {exc}") from exc
        except koji.GenericError as exc:
            raise KojiError(f"Koji refused {method}: {exc}") from exc
        except (requests.RequestException, OSError) as exc:
            raise KojiUnavailable(f"Koji is unreachable ({method}): {exc}") from exc

    def build(self, ref: int | str) -> KojiBuildInfo | None:
        """The build with id or NVR ``ref``, or ``None`` if Koji has none."""
        info = self._call("getBuild", ref)
        return None if not info else _build(info)

    def build_types(self, build_id: int) -> set[str]:
        """The types of a build (``rpm``, ``image``, ``maven`` ...)."""
        types = self._call("getBuildType", build_id)
        return set(types or {})

    def rpms(self, build_id: int) -> list[KojiRpm]:
        """Every RPM of a build, source RPM included."""
        return [
            KojiRpm(
                id=int(r["id"]),
                name=r["name"],
                version=r["version"],
                release=r["release"],
                epoch=r.get("epoch"),
                arch=r["arch"],
                size=int(r["size"]),
                payloadhash=str(r["payloadhash"]).lower(),
                raw=r,
            )
            for r in self._call("listRPMs", buildID=build_id)
        ]

    def signatures(self, rpm_ids: list[int]) -> dict[int, set[str]]:
        """The signing keys Koji holds a signed copy for, per RPM id (one round trip)."""
        if not rpm_ids:
            return {}
        try:
            with self._session.multicall(strict=True) as m:
                calls = [m.queryRPMSigs(rpm_id=rpm_id) for rpm_id in rpm_ids]
        except (koji.ServerOffline, koji.RetryError) as exc:
            raise KojiUnavailable(f"Koji is offline: {exc}") from exc
        except koji.GenericError as exc:
            raise KojiError(f"Koji refused queryRPMSigs: {exc}") from exc
        except (requests.RequestException, OSError) as exc:
            raise KojiUnavailable(f"Koji is unreachable (queryRPMSigs): {exc}") from exc
        return {
            rpm_id: {str(s["sigkey"]).lower() for s in call.result if s.get("sigkey")}
            for rpm_id, call in zip(rpm_ids, calls, strict=True)
        }

    def completed_since(self, after: datetime | None) -> list[KojiBuildInfo]:
        """Builds completed after ``after`` (all completed builds for ``None``), oldest first."""
        kwargs: dict[str, Any] = {"state": int(BuildState.COMPLETE)}
        if after is not None:
            kwargs["completeAfter"] = after.timestamp()
        builds = [_build(b) for b in self._call("listBuilds", **kwargs)]
        return sorted(builds, key=lambda b: b.completed_at or datetime.min.replace(tzinfo=UTC))

    def tagged(self, tag: str) -> list[KojiBuildInfo]:
        """Every build in ``tag`` (inherited ones included), not only the latest."""
        return [_build(b) for b in self._call("listTagged", tag, inherit=True)]

    def tags_of(self, build_id: int) -> list[str]:
        """The names of the tags a build is in."""
        return [t["name"] for t in self._call("listTags", build=build_id)]

    def rpm_url(self, build: KojiBuildInfo, rpm: KojiRpm, sigkey: str | None = None) -> str:
        """Where Koji serves ``rpm``: the unsigned copy, or the one signed with ``sigkey``."""
        base = self.pathinfo.build(build.raw)
        relative = self.pathinfo.signed(rpm.raw, sigkey) if sigkey else self.pathinfo.rpm(rpm.raw)
        return f"{base}/{relative}"
