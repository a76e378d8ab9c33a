"""gunicorn defaults for the intake; ``retrace-intake serve --config FILE`` replaces them
(deploy/gunicorn.conf.py is the documented starting point), and ``GUNICORN_CMD_ARGS``
overrides single settings.

Uploads are large and may be slow (a 50 MiB core over a poor link takes minutes):
threaded workers keep a slow client from holding a whole process, and the intake
itself bounds each upload's duration and the uploads per client address.  The
timeout is the worker's heartbeat to the master, not a cap on one request.
"""

import os
import shutil
import tempfile
from typing import Any

bind = os.environ.get("RETRACE_INTAKE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("RETRACE_INTAKE_WORKERS", "2"))
worker_class = "gthread"
# One thread per upload or status request in progress; a slow upload holds one thread.
threads = int(os.environ.get("RETRACE_INTAKE_THREADS", "8"))
timeout = 120
graceful_timeout = 60
keepalive = 5
# Large bodies are streamed by the app; these only bound the request line and headers.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# The intake decides itself which proxies it believes (settings: intake.trusted_proxies,
# intake.require_https); gunicorn must not turn a client's X-Forwarded-Proto into https.
secure_scheme_headers: dict[str, str] = {}
forwarded_allow_ips = "127.0.0.1"
accesslog = "-"


# Metrics: every worker counts into files in one folder, and whichever worker answers
# /metrics adds them all up (prometheus_client's multiprocess mode).  The folder is made
# before the workers start, so each of them inherits its name.
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(_server: Any) -> None:
    """Give this gunicorn a fresh metrics folder of its own, unless one is configured."""
    if not os.environ.get(METRICS_DIR):
        os.environ[METRICS_DIR] = tempfile.mkdtemp(prefix="retrace-intake-metrics-")
        os.environ["RETRACE_INTAKE_OWN_METRICS_DIR"] = "1"


def child_exit(_server: Any, worker: Any) -> None:
    """A worker's gauges die with it; its counters stay in the sums."""
    from prometheus_client import multiprocess  # noqa: PLC0415 -- only in gunicorn

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(_server: Any) -> None:
    """Remove the metrics folder this gunicorn made."""
    if os.environ.get("RETRACE_INTAKE_OWN_METRICS_DIR"):
        shutil.rmtree(os.environ[METRICS_DIR], ignore_errors=True)
