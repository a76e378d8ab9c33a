#!/usr/bin/env bash
# Stops the services that deploy/demo.sh left running.
set -uo pipefail
RUN=${RETRACE_HOME:-$(cd "$(dirname "$0")/.." && pwd)/var/demo}/run
for name in intake analyzer; do
  pidfile=$RUN/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
done
