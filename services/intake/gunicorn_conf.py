"""gunicorn defaults for the intake; ``retrace-intake serve --config FILE`` replaces them
(deploy/gunicorn.conf.py is the documented starting point), and ``GUNICORN_CMD_ARGS``
overrides single settings.

Uploads are large and may be slow (a 50 MiB core over a poor link takes minutes):
the worker (services/intake/worker.py) is gunicorn's gthread that waits for request
heads in its event loop, so idle and slow sockets hold no thread until a request has
come; an upload being received holds one thread (it is read with blocking reads and
decoded in a thread of its own), and a worker takes at most ``threads - 8`` uploads at
once, so heartbeats and status requests always find a thread.  The intake itself
bounds each upload's duration and the uploads per client address.  The timeout is the
worker's heartbeat to the master, not a cap on one request.
"""

import os
import shutil
import tempfile
from typing import Any

bind = os.environ.get("RETRACE_INTAKE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("RETRACE_INTAKE_WORKERS", "2"))
worker_class = "services.intake.worker.IntakeWorker"
# One thread per request being served; an upload being received holds one for its
# whole length, idle sockets and request heads still coming hold none.
threads = int(os.environ.get("RETRACE_INTAKE_THREADS", "256"))
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


def post_fork(_server: Any, worker: Any) -> None:
    """Tell the worker's intake how many uploads it may receive at once."""
    from services.intake.worker import UPLOAD_SLOTS, upload_slots  # noqa: PLC0415

    os.environ[UPLOAD_SLOTS] = str(upload_slots(worker.cfg.threads))


def child_exit(_server: Any, worker: Any) -> None:
    """A worker's gauges die with it; its counters stay in the sums.  The uploads it
    was receiving are let go at once (their rows, their partial folders)."""
    from prometheus_client import multiprocess  # noqa: PLC0415 -- only in gunicorn

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    from services.intake.leases import release_dead_worker  # noqa: PLC0415 -- only in gunicorn

    release_dead_worker(worker.pid)


def on_exit(_server: Any) -> None:
    """Remove the metrics folder this gunicorn made."""
    if os.environ.get("RETRACE_INTAKE_OWN_METRICS_DIR"):
        shutil.rmtree(os.environ[METRICS_DIR], ignore_errors=True)
