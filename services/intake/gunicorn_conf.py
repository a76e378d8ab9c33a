"""gunicorn defaults for the intake; ``retrace-intake serve --config FILE`` replaces them
(deploy/gunicorn.conf.py is the documented starting point), and ``GUNICORN_CMD_ARGS``
overrides single settings.

Uploads are large and may be slow (a 50 MiB core over a poor link takes minutes):
threaded workers keep a slow client from holding a whole process, and the intake
itself bounds each upload's duration and the uploads per client address.  The
timeout is the worker's heartbeat to the master, not a cap on one request.
"""

import os

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
