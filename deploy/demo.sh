#!/usr/bin/env bash
# Brings the stack up on this machine and shows it doing its job: builds a real
# package and a real crash with the fixture builder, mirrors the RPMs, submits the
# crash as ABRT's client would, waits, and prints the backtrace.  The intake and
# the analyzer are left running (stop them with 'make stop').
set -euo pipefail
cd "$(dirname "$0")/.."

export RETRACE_HOME=${RETRACE_HOME:-$PWD/var/demo}
PORT=${RETRACE_DEMO_PORT:-8080}
URL=http://127.0.0.1:$PORT
BIN=$PWD/.venv/bin
RUN=$RETRACE_HOME/run
mkdir -p "$RUN"

say() { printf '\n==> %s\n' "$*"; }

"$(dirname "$0")/stop-demo.sh" >/dev/null 2>&1 || true
# Each run starts from an empty store, spool and repo: a rebuilt sample package has
# the same NEVRA with other bytes, which a mirror rightly refuses to take twice.
rm -rf "$RETRACE_HOME/var"

say "building the sample package and crash (tests/fixtures)"
"$BIN/python" -m tests.fixtures.build --out "$RETRACE_HOME/fixtures"

say "database schema and broker topology"
"$BIN/retrace-admin" migrate
"$BIN/retrace-admin" topology
"$BIN/retrace-admin" policies

say "starting the intake on $URL and one analyzer"
nohup "$BIN/retrace-intake" serve --bind "127.0.0.1:$PORT" >"$RUN/intake.log" 2>&1 &
echo $! >"$RUN/intake.pid"
nohup "$BIN/retrace-analyzer" run >"$RUN/analyzer.log" 2>&1 &
echo $! >"$RUN/analyzer.pid"
for _ in $(seq 100); do curl -sf "$URL/settings" >/dev/null && break; sleep 0.2; done
curl -sf "$URL/settings"

say "mirroring the RPMs (retrace-mirror import)"
"$BIN/retrace-mirror" import "$RETRACE_HOME"/fixtures/rpms/*.rpm

say "submitting the crash, packed as ABRT's client packs it (tar | xz -2)"
crash=$RETRACE_HOME/fixtures/crash/segv-in-lib
archive=$RUN/crash.tar.xz
tar -C "$crash" -c coredump executable package os_release | xz -2 >"$archive"
headers=$(curl -sS -D - -o /dev/null -H 'Content-Type: application/x-xz-compressed-tar' \
  --data-binary @"$archive" "$URL/create" | tr -d '\r')
echo "$headers" | grep -E '^(HTTP|X-Task)'
task=$(echo "$headers" | sed -n 's/^X-Task-Id: //p')
password=$(echo "$headers" | sed -n 's/^X-Task-Password: //p')
[ -n "$task" ] || { echo "the upload was refused" >&2; exit 1; }

say "waiting for task $task"
status=PENDING
for _ in $(seq 300); do
  answer=$(curl -sS -D - -H "X-Task-Password: $password" "$URL/$task" | tr -d '\r')
  status=$(echo "$answer" | sed -n 's/^X-Task-Status: //p')
  # Passwords are single-use: each answer carries the next one.
  next=$(echo "$answer" | sed -n 's/^X-Task-Password: //p')
  [ -n "$next" ] && password=$next
  [ "$status" != PENDING ] && break
  sleep 1
done
echo "X-Task-Status: $status"

if [ "$status" = FINISHED_SUCCESS ]; then
  say "backtrace ($URL/$task/backtrace)"
  curl -sS -D "$RUN/answer-headers" -H "X-Task-Password: $password" "$URL/$task/backtrace"
  next=$(tr -d '\r' <"$RUN/answer-headers" | sed -n 's/^X-Task-Password: //p')
  [ -n "$next" ] && password=$next
else
  say "log ($URL/$task/log)"
  curl -sS -H "X-Task-Password: $password" "$URL/$task/log"
  exit 1
fi
say "the log: curl -H 'X-Task-Password: $password' $URL/$task/log"
echo "intake and analyzer keep running (logs in $RUN); stop them with: make stop"
