# gunicorn settings for a production intake: retrace-intake serve --config deploy/gunicorn.conf.py
#
# Built for large, slow uploads behind a TLS-terminating proxy (deploy/nginx-retrace.conf):
# - the intake's worker (services/intake/worker.py): gunicorn's gthread, except that idle
#   connections and request heads still arriving wait in the worker's event loop, not
#   in a thread, and a connection closed after an answer lingers there too.  An upload
#   being received holds one thread (blocking reads, decoded in a thread of its own);
#   a worker takes at most threads - 8 uploads at once (503 beyond), so heartbeats and
#   status requests always find a thread.  The intake bounds an upload's duration
#   (intake.upload_timeout_seconds) and the uploads per client address
#   (intake.max_uploads_per_client).  Size (threads - 8) * workers above the uploads
#   you expect at once, slow ones included.
# - the body is streamed by the application straight into the spool: nothing here buffers
#   it, and the proxy must not either (proxy_request_buffering off).
# - the timeout is the worker's heartbeat, not a limit on one request.
# - forwarded headers: the intake itself believes X-Forwarded-For / X-Forwarded-Proto
#   only from intake.trusted_proxies; gunicorn is told to rewrite nothing.

from services.intake.gunicorn_conf import *  # noqa: F403 -- start from the built-in defaults

bind = "127.0.0.1:8000"  # the proxy's upstream; never expose gunicorn directly
workers = 4  # about one per core
threads = 256  # an idle thread costs little; uploads beyond threads - 8 get a 503
timeout = 120
graceful_timeout = 900  # let uploads in flight finish on a restart
keepalive = 5
max_requests = 10000  # recycle workers now and then
max_requests_jitter = 1000
