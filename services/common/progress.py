"""The one-line progress texts of ``GET /<id>``, in the original Retrace Server's words."""

QUEUED = "Waiting for an analyzer"
ANALYZE = "Analyzing crash data"
INIT = "Preparing environment for backtrace generation"
BACKTRACE = "Generating backtrace"
CLEANUP = "Cleaning environment after backtrace generation"
SUCCESS = "Retrace job finished successfully"
FAIL = "Retrace job failed"
