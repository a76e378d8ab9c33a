"""gunicorn defaults for the intake; ``GUNICORN_CMD_ARGS`` or ``-c FILE`` override them.

Uploads are large and may be slow: threaded workers keep a slow client from
holding a whole process, and the timeout is the worker's heartbeat, not a cap on
one request.
"""

import os

bind = os.environ.get("RETRACE_INTAKE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("RETRACE_INTAKE_WORKERS", "2"))
worker_class = "gthread"
threads = 4
timeout = 120
graceful_timeout = 30
# Large bodies are streamed by the app; these only bound the request line and headers.
limit_request_line = 8190
limit_request_fields = 100
accesslog = "-"
