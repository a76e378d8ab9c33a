"""What the server offers: ``GET /settings`` and ``GET /checkpackage``."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import falcon
from pydantic import TypeAdapter, ValidationError

from schemas.messages import MirrorBuildV1, Nvr
from schemas.nvr import parse_nvr
from schemas.topology import MIRROR_BUILD
from services.common.bus import Publish, PublishError
from services.common.data.intake import IntakeData
from services.common.data.mirror import MirrorData
from services.common.settings import IntakeSettings
from services.intake.clients import client_address
from services.intake.create import ACTIVE
from services.intake.errors import Refusal
from services.intake.releases import (
    RAWHIDE,
    ClientRelease,
    machine_arch,
    package_arches,
    supported,
)
from services.intake.upload import DECODERS

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class SettingsResource:
    """``GET /settings``: limits, formats and releases, in the original's ``key value``
    lines, or as a JSON object when the client asks for ``application/json``."""

    def __init__(self, settings: IntakeSettings, data: IntakeData, index: MirrorData) -> None:
        self._settings = settings
        self._data = data
        self._index = index

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings
        values: dict[str, int | list[str]] = {
            "running_tasks": self._data.count_tasks(ACTIVE),
            "max_running_tasks": limits.max_running_tasks,
            "max_packed_size": limits.max_packed_size_mib,
            "max_unpacked_size": limits.max_unpacked_size_mib,
            "supported_formats": list(DECODERS),
            "supported_releases": supported_releases(limits, self._index),
        }
        if wants_json(req):
            resp.content_type = falcon.MEDIA_JSON
            resp.text = json.dumps(values)
            return
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "".join(
            f"{key} {' '.join(value) if isinstance(value, list) else value}\n"
            for key, value in values.items()
        )


def supported_releases(settings: IntakeSettings, index: MirrorData) -> list[str]:
    """The releases offered to clients, spelled as ABRT's client spells its own.

    Those the intake is configured for (``releases``) and those the mirror holds, on
    the architectures an analyzer takes (a core of any other is refused anyway):
    newest first, at most 32, since the client looks for its string in the first 32.
    """
    held = index.mirrored_releases()
    configured = [(release, arch) for release in settings.releases for arch in settings.arches]
    pairs = [(release, arch) for release, arch in held if arch in settings.arches]
    return supported([*configured, *pairs], settings.rawhide)


def wants_json(req: falcon.Request) -> bool:
    """Whether the client prefers JSON to plain text (the original's format)."""
    return req.client_prefers([falcon.MEDIA_TEXT, falcon.MEDIA_JSON]) == falcon.MEDIA_JSON and (
        "json" in (req.accept or "")
    )


class RateLimiter:
    """At most ``limit`` requests per client address in each window of ``seconds``.

    Kept in this worker's memory (a fixed window per address): with N gunicorn
    workers an address may get up to N times the limit.  That bounds what one client
    makes us ask the store and Koji; a proxy's limit (nginx ``limit_req``) is the
    place for an exact, global one.
    """

    def __init__(self, limit: int, seconds: int, clock: Clock = time.monotonic) -> None:
        self._limit = limit
        self._seconds = seconds
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._prune_at = 1024

    def admit(self, client: str) -> float:
        """0 if ``client`` may go on, else the seconds until its window ends."""
        now = self._clock()
        with self._lock:
            start, count = self._windows.get(client, (now, 0))
            if now - start >= self._seconds:
                start, count = now, 0
            if count >= self._limit:
                return start + self._seconds - now
            self._windows[client] = (start, count + 1)
            if len(self._windows) >= self._prune_at:
                self._prune(now)
            return 0.0

    def _prune(self, now: float) -> None:
        # Forget windows that ended; the table stays about as big as the busy clients.
        self._windows = {
            client: window
            for client, window in self._windows.items()
            if now - window[0] < self._seconds
        }
        self._prune_at = max(1024, 2 * len(self._windows))


@dataclass(frozen=True)
class KojiBuild:
    """A build Koji has and the mirror would fetch, as the mirror's HTTP face answers."""

    nvr: str
    build_id: int


class MirrorLookup:
    """Asks the mirror's HTTP face whether Koji has a build (``GET /koji/builds/<nvr>``).

    Bounded by ``timeout``: a mirror that does not answer in time counts as "no",
    so ``/checkpackage`` answers 404 as it would without a mirror to ask.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = timeout

    def koji_build(self, nvr: str) -> KojiBuild | None:
        """The COMPLETE Koji build ``nvr`` the mirror would fetch, or ``None``."""
        url = f"{self._base}/koji/builds/{urllib.parse.quote(nvr, safe='')}"
        try:
            # The URL is our own setting, http(s) only (checked when the settings load).
            with urllib.request.urlopen(url, timeout=self._timeout) as answer:  # noqa: S310
                body = json.loads(answer.read(65536))
            return KojiBuild(nvr=str(body["nvr"]), build_id=int(body["build_id"]))
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                log.warning("the mirror could not say whether Koji has %s: %s", nvr, exc)
            exc.close()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreachable, too slow (a timeout is an OSError), or a body we cannot read.
            log.warning("the mirror did not say whether Koji has %s: %r", nvr, exc)
        return None


_NVR = TypeAdapter(Nvr)


def _is_nvr(nvr: str) -> bool:
    """Whether a mirror command may name ``nvr`` (else there is nothing to ask about)."""
    try:
        _NVR.validate_python(nvr)
    except ValidationError:
        return False
    return True


# How long a build whose fetch this worker requested answers 302 without asking again:
# a crash seen on many machines at once makes one Koji lookup and one command, not many.
REQUESTED_SECONDS = 300.0


class CheckPackageResource:
    """``GET /checkpackage``: whether the server can retrace a crash of this package.

    The answer to "yes" is a bare 302, as the original server's: it has no
    ``Location``, because a client that followed one would fail.  A build the mirror
    lacks but Koji has is "yes" too: the mirror is told to fetch it, and the task
    waits for it as the analyzer makes any task wait for a build being fetched.
    """

    def __init__(
        self,
        settings: IntakeSettings,
        index: MirrorData,
        publish: Publish,
        mirror: MirrorLookup | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._settings = settings
        self._index = index
        self._publish = publish
        self._mirror = mirror
        self._clock = clock
        self._limiter = RateLimiter(
            settings.checkpackage_limit, settings.checkpackage_window_seconds, clock
        )
        self._requested: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = client_address(req, self._settings.trusted_proxies)
        wait = self._limiter.admit(client)
        if wait:
            raise Refusal(
                429,
                f"{client} asked about more than {self._settings.checkpackage_limit} packages "
                f"in {self._settings.checkpackage_window_seconds} s; try again later",
                {"Retry-After": str(max(1, math.ceil(wait)))},
                code="checkpackage_rate",
            )
        nvr = (req.get_header("X-Package-NVR") or "").strip()
        arch = (req.get_header("X-Package-Arch") or "").strip()
        if not nvr or not arch:
            raise Refusal(
                400, "send the package as X-Package-NVR and X-Package-Arch", code="checkpackage"
            )
        parsed = parse_nvr(nvr)
        if parsed is None:
            raise Refusal(
                400, f"X-Package-NVR {nvr[:80]!r} is not name-version-release", code="checkpackage"
            )
        # An epoch, if given, is not part of the index key.
        name, version, release = parsed.name, parsed.version, parsed.release
        os_releases = self._os_releases(req.get_header("X-OS-Release"))
        resp.content_type = falcon.MEDIA_TEXT
        found = self._index.holds_build(
            name, version, release, package_arches(arch), os_releases
        ) or self._fetching(f"{name}-{version}-{release}", client)
        if not found:
            raise Refusal(404, f"this server has no {nvr}.{arch}", code="no_package")
        resp.status = falcon.HTTP_302
        resp.text = ""

    def _os_releases(self, header: str | None) -> set[str] | None:
        """The store's names of the release ``X-OS-Release`` names (``None``: any release).

        Refuses with 404 a release whose crashes this server cannot retrace, before
        the store or Koji is asked: a machine of an architecture no analyzer takes
        (its core would be refused at upload), Rawhide when no setting names it.
        """
        if header is None or not header.strip():
            return None
        named = ClientRelease.parse(header)
        if named is None:
            raise Refusal(
                400,
                f"X-OS-Release {header.strip()[:80]!r} is not like fedora-40-x86_64",
                code="checkpackage",
            )
        if machine_arch(named.arch) not in self._settings.arches:
            raise Refusal(
                404,
                f"this server retraces crashes of {', '.join(self._settings.arches)} "
                f"machines, not {named.arch}",
                code="no_package",
            )
        known: set[str] = set(self._settings.releases)
        if named.version == RAWHIDE:
            known |= {release for release, _ in self._index.mirrored_releases()}
        releases = named.os_releases(known, self._settings.rawhide)
        if not releases:
            raise Refusal(404, f"this server does not retrace {named}", code="no_package")
        return releases

    def _fetching(self, nvr: str, client: str) -> bool:
        """Whether the build will be mirrored: Koji has it (the mirror says so) and the
        mirror was told to fetch it, now or in the last :data:`REQUESTED_SECONDS`."""
        if self._mirror is None or not _is_nvr(nvr):
            return False
        now = self._clock()
        with self._lock:
            asked = self._requested.get(nvr)
            if asked is not None and now - asked < REQUESTED_SECONDS:
                return True
        build = self._mirror.koji_build(nvr)
        if build is None:
            return False
        command = MirrorBuildV1(build=build.nvr, requested_by=f"intake, checkpackage from {client}")
        try:
            self._publish(MIRROR_BUILD, command, None)
        except PublishError as exc:
            # Still "yes": the analyzer asks the mirror for a crashed build it lacks.
            log.warning("could not ask the mirror to fetch %s: %s", build.nvr, exc)
            return True
        log.info(
            "asked the mirror to fetch %s (Koji build %d) for %s", build.nvr, build.build_id, client
        )
        with self._lock:
            self._requested = {
                k: t for k, t in self._requested.items() if now - t < REQUESTED_SECONDS
            }
            self._requested[nvr] = now
        return True
