#!/usr/bin/env bash
# Prepares this machine for Retrace Server development, the demo and the tests:
# the system tools the services run, a RabbitMQ that answers, and the virtualenv.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package names of the tools the services and the fixture builder run.
PACKAGES=(
  gdb elfutils rpm rpm2cpio cpio debugedit gcc make xz-utils curl wget zstd
  createrepo-c dnf debuginfod libkrb5-dev systemd git
  bubblewrap dwz g++ file
)

say() { printf '==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The fixture builder fetches libc6-dbg with 'apt-get download': the lists must know it.
policy=$(apt-cache policy libc6-dbg 2>/dev/null || true)
if [ ${#missing[@]} -gt 0 ] || [[ "$policy" != *"Candidate: "[0-9]* ]]; then
  say "apt-get update"
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# RabbitMQ: use the one that answers on 127.0.0.1:5672, or install and start one.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  if ! command -v rabbitmq-server >/dev/null; then
    say "installing rabbitmq-server"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached
  for _ in $(seq 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 1
  done
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "RabbitMQ did not start" >&2; exit 1; }
fi

# Delivery limits and dead-lettering are RabbitMQ policies, which only the management
# HTTP API can set ('retrace-admin policies'); the plugin starts without a restart.
if ! (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; then
  say "enabling rabbitmq_management"
  as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 60); do
    (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && break
    sleep 1
  done
fi

# The application lives in a virtualenv of its own, never in a shared site-packages.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml schemas/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  say "installing the project into .venv"
  .venv/bin/pip install -q --upgrade pip
  # schemas/ is a distribution of its own (retrace-server-messages), which the server
  # depends on by name: both are installed by the one command, so pip takes it from here.
  .venv/bin/pip install -q -e './schemas[fedora-messaging]' -e '.[intake,analyzer,mirror,dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
say "host ready"
