#!/usr/bin/env bash
# Serves the debuginfod protocol for every mirrored package: elfutils' own debuginfod
# scanning the mirror's repository of RPMs (-R).  No code of ours answers these requests.
#
#   deploy/debuginfod.sh [PORT]         (default 8002, debuginfod's usual port)
#
# The repository is the one the settings name (RETRACE_CONFIG / RETRACE_HOME), or
# RETRACE_REPO if set.  Clients: DEBUGINFOD_URLS=http://HOST:PORT gdb ...
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${1:-8002}
PYTHON=${PYTHON:-.venv/bin/python}
REPO=${RETRACE_REPO:-$("$PYTHON" -c 'from services.common.settings import MirrorConfig, load_settings; print(load_settings(MirrorConfig).repo)')}
# debuginfod's index of the RPMs' contents lives beside the repository, not in it.
DB=${DEBUGINFOD_DB:-$REPO/../debuginfod.sqlite}
# Seconds between rescans: new builds are found without a restart.
RESCAN=${DEBUGINFOD_RESCAN:-60}

mkdir -p "$REPO"
exec debuginfod --port="$PORT" --database="$DB" --rescan-time="$RESCAN" \
  --regex-groom --exclude='/\.incoming/' -R "$REPO"
