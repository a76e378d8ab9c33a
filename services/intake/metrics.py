"""Every metric the intake exports, declared in one registry (``GET /metrics``).

Under gunicorn, counters are kept in prometheus_client's multiprocess files (the
folder named by ``PROMETHEUS_MULTIPROC_DIR``, made by the gunicorn config), so any
worker's answer sums every worker's counts.  Gauges that describe shared state (tasks
by state, queue depth, spool free space) are read from the store, the broker and the
disk at scrape time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import falcon
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.data.intake import IntakeData, TaskStatus

log = logging.getLogger(__name__)

PREFIX = "retrace_intake"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class _SharedState(Collector):
    """Gauges read when scraped."""

    def __init__(
        self,
        data: IntakeData,
        spool: Path,
        free_space: Callable[[Path], int],
        queue_depth: Callable[[], int | None],
    ) -> None:
        self._data = data
        self._spool = spool
        self._free_space = free_space
        self._queue_depth = queue_depth

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily(
            f"{PREFIX}_tasks", "Tasks in the store, by state", labels=["state"]
        )
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Analyze commands waiting in the broker's queues"
        )
        free = GaugeMetricFamily(
            f"{PREFIX}_spool_free_bytes", "Free bytes on the spool's filesystem"
        )
        if fill:
            try:
                for state, count in self._data.count_tasks_by_status().items():
                    by_state.add_metric([state.value], count)
            except Exception:
                log.warning("metrics: the store did not answer", exc_info=True)
            queued = self._queue_depth()
            if queued is not None:
                depth.add_metric([], queued)
            if self._spool.exists():
                free.add_metric([], self._free_space(self._spool))
        yield by_state
        yield depth
        yield free


class Metrics:
    """The intake's metrics, in a registry of their own (no process-global state)."""

    def __init__(self) -> None:
        self._shared: _SharedState | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_received_bytes",
            "Bytes of upload bodies received",
            registry=self.registry,
        )
        self.refused_uploads = Counter(
            f"{PREFIX}_refused_uploads",
            "Uploads refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.created_tasks = Counter(
            f"{PREFIX}_created_tasks",
            "Tasks created, by type",
            ["task_type"],
            registry=self.registry,
        )

    def watch(
        self,
        data: IntakeData,
        spool: Path,
        free_space: Callable[[Path], int],
        queue_depth: Callable[[], int | None],
    ) -> None:
        """Export the shared-state gauges, read from these at each scrape."""
        self._shared = _SharedState(data, spool, free_space, queue_depth)
        self.registry.register(self._shared)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, every worker's counters summed."""
        if not os.environ.get(MULTIPROCESS_DIR):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._shared is not None:
            registry.register(self._shared)
        return generate_latest(registry)

    def names(self) -> set[str]:
        """The names of every declared metric family."""
        return {m.name for m in self.registry.collect()}


class MetricsMiddleware:
    """Counts every answer by route template, method and status."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_response(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        _resource: object,
        _req_succeeded: bool,
    ) -> None:
        route = req.uri_template or "(none)"
        status = str(resp.status_code)
        self._metrics.requests.labels(route, req.method, status).inc()


class MetricsResource:
    """``GET /metrics`` in Prometheus' text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self._metrics.exposition()


def statuses() -> tuple[str, ...]:
    """Task states as the ``state`` label spells them."""
    return tuple(state.value for state in TaskStatus)
