# gunicorn settings for a production intake: retrace-intake serve --config deploy/gunicorn.conf.py
#
# Built for large, slow uploads behind a TLS-terminating proxy (deploy/nginx-retrace.conf):
# - gthread workers: each upload in progress holds one thread, not a process, so a few
#   slow clients do not starve status requests.  The intake bounds an upload's duration
#   (intake.upload_timeout_seconds) and the uploads per client address
#   (intake.max_uploads_per_client); size threads * workers above
#   max_uploads_per_client * the number of clients you expect at once.
# - the body is streamed by the application straight into the spool: nothing here buffers
#   it, and the proxy must not either (proxy_request_buffering off).
# - the timeout is the worker's heartbeat, not a limit on one request.
# - forwarded headers: the intake itself believes X-Forwarded-For / X-Forwarded-Proto
#   only from intake.trusted_proxies; gunicorn is told to rewrite nothing.

from services.intake.gunicorn_conf import *  # noqa: F403 -- start from the built-in defaults

bind = "127.0.0.1:8000"  # the proxy's upstream; never expose gunicorn directly
workers = 4  # about one per core
threads = 16
timeout = 120
graceful_timeout = 900  # let uploads in flight finish on a restart
keepalive = 5
max_requests = 10000  # recycle workers now and then
max_requests_jitter = 1000
