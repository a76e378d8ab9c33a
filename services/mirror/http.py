"""The mirror's HTTP face: the repository tree for dnf, heartbeats and ``/metrics``.

``GET /<os_release>/<arch>/repodata/repomd.xml`` and ``.../Packages/<file>.rpm``
make each release and architecture a dnf repository
(``dnf --repofrompath=m,http://host/fedora-40/x86_64``).  The debuginfod API is
not ours: elfutils' ``debuginfod`` serves it over the same tree (deploy/).
``GET /koji/builds/<nvr>`` tells the intake whether Koji has a build the mirror
lacks and would fetch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.core import Metric as Metric_
from prometheus_client.registry import Collector

from services.common import architecture
from services.common.data.db import Database
from services.common.data.mirror import MirrorData
from services.common.logs import setup_logging
from services.common.settings import MirrorConfig, MirrorSettings, load_settings, log_settings
from services.mirror.fetcher import Fetcher
from services.mirror.koji import BuildState, KojiError, KojiHub, KojiUnavailable
from services.mirror.worker import KojiHealth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """One metric the mirror exports."""

    name: str
    kind: str
    help: str


METRICS = {
    m.name: m
    for m in (
        Metric("retrace_mirror_packages", "gauge", "RPM files in the mirror's index"),
        Metric("retrace_mirror_package_bytes", "gauge", "Total size of the mirrored RPM files"),
        Metric("retrace_mirror_builds", "gauge", "Koji builds the mirror has seen, by state"),
        Metric(
            "retrace_mirror_last_sync_timestamp_seconds",
            "gauge",
            "When the mirror last finished a Koji build (Unix time)",
        ),
        Metric(
            "retrace_mirror_index_conflicts_total",
            "counter",
            "Header .build-id links that the package's own ELF files contradicted "
            "(the ELF content was indexed)",
        ),
        Metric(
            "retrace_mirror_koji_up",
            "gauge",
            "Whether the worker reached Koji at its last try (1) or found it unreachable (0), "
            "its commands waiting on the broker meanwhile",
        ),
        Metric(
            "retrace_mirror_koji_last_failure_timestamp_seconds",
            "gauge",
            "When the worker last found Koji unreachable (Unix time)",
        ),
        Metric(
            "retrace_mirror_packages_to_reindex",
            "gauge",
            "Packages indexed the old way, from their header links alone "
            "('retrace-mirror reindex' reads their ELF files)",
        ),
    )
}
"""Every metric name, declared once; :func:`render_metrics` refuses any other."""


class _Snapshot(Collector):
    """The metric families read from the store for one scrape."""

    def __init__(self, families: list[Metric_]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric_]:
        yield from self._families


def render_metrics(samples: list[tuple[str, dict[str, str], float]]) -> str:
    """Prometheus' text format (prometheus-client's) for ``(name, labels, value)``
    samples of declared metrics; an undeclared name is a bug (``KeyError``)."""
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for name, labels, value in samples:
        metric = METRICS[name]
        family = families.get(name)
        if family is None:
            kind = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            family = families[name] = kind(name, metric.help, labels=sorted(labels))
        family.add_metric([labels[key] for key in sorted(labels)], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(families.values())))
    return generate_latest(registry).decode()


class MetricsResource:
    """``GET /metrics``."""

    def __init__(self, data: MirrorData) -> None:
        self._data = data

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        counts = self._data.counts()
        samples: list[tuple[str, dict[str, str], float]] = [
            ("retrace_mirror_packages", {}, float(counts.packages)),
            ("retrace_mirror_package_bytes", {}, float(counts.package_bytes)),
            ("retrace_mirror_index_conflicts_total", {}, float(counts.index_conflicts)),
            ("retrace_mirror_packages_to_reindex", {}, float(counts.reindex_backlog)),
        ]
        samples += [
            ("retrace_mirror_builds", {"state": s}, float(n)) for s, n in counts.builds.items()
        ]
        if counts.last_sync is not None:
            samples.append(
                ("retrace_mirror_last_sync_timestamp_seconds", {}, counts.last_sync.timestamp())
            )
        answered, unreachable = KojiHealth(self._data).last()
        if answered is not None or unreachable is not None:
            up = unreachable is None or (answered is not None and answered >= unreachable)
            samples.append(("retrace_mirror_koji_up", {}, float(up)))
        if unreachable is not None:
            samples.append(
                ("retrace_mirror_koji_last_failure_timestamp_seconds", {}, unreachable.timestamp())
            )
        resp.content_type = CONTENT_TYPE_LATEST
        resp.text = render_metrics(samples)


class LbHeartbeat:
    """``GET /__lbheartbeat__``: the process is up."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Heartbeat:
    """``GET /__heartbeat__``: the store and the repository answer (503 if one does not)."""

    def __init__(self, data: MirrorData, repo: Path) -> None:
        self._data = data
        self._repo = repo

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        try:
            architecture.MIRROR.check_schema(self._data.db)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 -- any failure is the answer
            checks["store"] = f"failing: {exc}"
        checks["repo"] = "ok" if os.access(self._repo, os.R_OK | os.X_OK) else "unreadable"
        healthy = all(v == "ok" for v in checks.values())
        resp.status = falcon.HTTP_200 if healthy else falcon.HTTP_503
        if not healthy:
            resp.set_header("Retry-After", "30")
        resp.media = {"status": "ok" if healthy else "failing", "checks": checks}


class Version:
    """``GET /__version__``."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"name": "retrace-server", "version": metadata.version("retrace-server")}


NVR = re.compile(r"^[A-Za-z0-9._+~^-]+-[^-/\s]+-[^-/\s]+$")

# Seconds one lookup may wait for Koji: the intake asking waits only a couple of seconds,
# and a worker of this app should not be held for mirror.koji_timeout by a slow hub.
KOJI_LOOKUP_TIMEOUT = 10


class NotFetchable(Exception):
    """Koji has no such build, or none this mirror would fetch; the message says which."""


class KojiLookup:
    """Whether Koji has a COMPLETE build of an NVR that this mirror would fetch.

    The fetcher's own filters decide (``mirror.packages``, ``mirror.releases``, the
    release from a configured tag or the dist tag), so "yes" means a mirror command
    for the build will place it.
    """

    def __init__(
        self, data: MirrorData, repo: Path, settings: MirrorSettings, koji: KojiHub
    ) -> None:
        self._settings = settings
        self._koji = koji
        # Only its filters are used here: it never fetches or publishes from this app.
        self._fetcher = Fetcher(data, repo, settings, koji, _never_publish)
        # koji's ClientSession is not made for concurrent calls.
        self._lock = threading.Lock()

    def __call__(self, nvr: str) -> dict[str, object]:
        """The build as ``{"nvr", "build_id", "os_release"}``.

        Raises :class:`NotFetchable` (saying why) when there is none to fetch, and
        :class:`KojiUnavailable` when Koji cannot be asked.
        """
        with self._lock:
            try:
                build = self._koji.build(nvr)
                release = None if build is None else self._fetcher.os_release(build)
            except KojiError as exc:
                raise NotFetchable(str(exc)) from exc
        if build is None:
            raise NotFetchable(f"Koji has no build {nvr}")
        if build.state != BuildState.COMPLETE:
            raise NotFetchable(f"Koji's build {nvr} is {build.state.name}, not COMPLETE")
        if not self._fetcher.wanted(build.name):
            raise NotFetchable(f"{build.name} is not in mirror.packages")
        if release is None:
            raise NotFetchable(f"no dist tag in {build.release!r} and no configured tag names one")
        if self._settings.releases and release not in self._settings.releases:
            raise NotFetchable(f"{release} is not in mirror.releases")
        return {"nvr": build.nvr, "build_id": build.id, "os_release": release}


def _never_publish(*_args: object) -> None:
    raise AssertionError("the mirror's HTTP face publishes nothing")


class KojiBuildResource:
    """``GET /koji/builds/{nvr}``: 200 and the build when Koji has a COMPLETE build of
    ``nvr`` that this mirror would fetch, 404 (and why) when not, 503 when Koji
    cannot be reached, 400 for what is not an NVR."""

    def __init__(self, lookup: KojiLookup) -> None:
        self._lookup = lookup

    def on_get(self, _req: falcon.Request, resp: falcon.Response, nvr: str) -> None:
        if not NVR.match(nvr) or len(nvr) > 512:
            resp.status = falcon.HTTP_400
            resp.media = {"reason": f"{nvr[:80]!r} is not name-version-release"}
            return
        try:
            resp.media = self._lookup(nvr)
        except NotFetchable as exc:
            resp.status = falcon.HTTP_404
            resp.media = {"reason": str(exc)}
        except KojiUnavailable as exc:
            log.warning("cannot tell whether Koji has %s: %s", nvr, exc)
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", "30")
            resp.media = {"reason": str(exc)}


def create_app(
    data: MirrorData, repo: Path, koji: KojiLookup | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The mirror's WSGI application over the repository at ``repo``; with ``koji``,
    it answers ``GET /koji/builds/<nvr>`` too."""
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App()
    app.add_route("/metrics", MetricsResource(data))
    if koji is not None:
        app.add_route("/koji/builds/{nvr}", KojiBuildResource(koji))
    app.add_route("/__lbheartbeat__", LbHeartbeat())
    app.add_route("/__heartbeat__", Heartbeat(data, repo))
    app.add_route("/__version__", Version())
    repo.mkdir(parents=True, exist_ok=True)
    app.add_static_route("/", str(repo.resolve()))
    return app


def build_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Read and check the settings and build the application (gunicorn's entry point)."""
    setup_logging()
    settings = load_settings(MirrorConfig)
    log_settings(settings, "retrace-mirror serve")
    db = Database.from_url(settings.store_url)
    architecture.MIRROR.check_schema(db)
    data = MirrorData(db)
    mirror = settings.mirror
    hub = KojiHub(
        mirror.koji_hub, mirror.koji_topurl, min(mirror.koji_timeout, KOJI_LOOKUP_TIMEOUT)
    )
    return create_app(data, settings.repo, KojiLookup(data, settings.repo, mirror, hub))


def serve(settings: MirrorConfig, data: MirrorData, bind: str, workers: int) -> int:
    """Run the HTTP face under gunicorn (replaces this process)."""
    del settings, data  # checked by the caller; each gunicorn worker builds its own
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--access-logfile",
        "-",
        "services.mirror.wsgi:application",
    ]
    log.info("serving the mirror on %s", json.dumps(bind))
    return os.execv(sys.executable, argv)  # noqa: S606 -- no shell, by design
