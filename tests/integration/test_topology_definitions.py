"""``retrace-admin topology --export``: the topology as a RabbitMQ definitions file.

The committed deploy/rabbitmq/definitions.json must be what the command writes
today, and the real RabbitMQ must accept it through the management API.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from schemas.messages import BuildSyncedV1, parse
from schemas.topology import (
    ANALYZE,
    ANALYZER_BUILD_SYNCED,
    BUILD_SYNCED,
    COMMAND_POLICY,
    MIRROR_BUILD,
    SUBSCRIPTION_POLICY,
)
from services.common.bus import Publisher, connect, declare_topology, policy_problem
from services.common.settings import AdminConfig, load_settings
from services.mirror.worker import declare_wait_queues, wait_queue

pytestmark = pytest.mark.integration

COMMITTED = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"
ADMIN = Path(sys.executable).parent / "retrace-admin"
COLUMNS = ("name", "type", "policy")


def _admin(tmp_path: Path, settings: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``retrace-admin ARGS`` with ``settings`` as its only configuration."""
    (tmp_path / "retrace.toml").write_text(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRACE_")}
    env["RETRACE_CONFIG"] = str(tmp_path / "retrace.toml")
    done = subprocess.run(
        [str(ADMIN), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def _export(tmp_path: Path, settings: str = "") -> Path:
    out = tmp_path / "definitions.json"
    done = _admin(tmp_path, settings, "topology", "--export", str(out))
    assert f"written to {out}" in done.stdout
    return out


def test_the_committed_definitions_file_is_current(tmp_path: Path) -> None:
    regenerated = _export(tmp_path).read_text()
    assert regenerated == COMMITTED.read_text(), (
        "deploy/rabbitmq/definitions.json is stale: regenerate it with "
        "'retrace-admin topology --export deploy/rabbitmq/definitions.json' (default settings)"
    )


def test_the_export_follows_the_configured_arches(tmp_path: Path) -> None:
    out = _export(tmp_path, '[analyzer]\narches = ["x86_64", "aarch64"]\n')
    queues = {q["name"] for q in json.loads(out.read_text())["queues"]}
    for arch in ("x86_64", "aarch64"):
        assert ANALYZE.queue_for(arch) in queues
        assert ANALYZE.dead_letter_queue_for(arch) in queues


def _management(url: str, method: str = "GET", body: bytes | None = None) -> Any:
    management = load_settings(AdminConfig, {}).broker.management_url
    token = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(
        f"{management}{url}",
        method=method,
        data=body,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read()
    return json.loads(text) if text.strip() else None


def _queues(vhost: str) -> dict[str, dict[str, str]]:
    # rabbitmqctl reads the queues' live state; the management API's copy lags by seconds.
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, *COLUMNS, "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {q.pop("name"): q for q in json.loads(listed.stdout)}


def test_rabbitmq_imports_the_committed_file_into_a_fresh_vhost(
    make_broker_url: Callable[[], str],
) -> None:
    broker_url = make_broker_url()
    vhost = urllib.parse.quote(pika.URLParameters(broker_url).virtual_host, safe="")
    _management(f"/api/definitions/{vhost}", "POST", COMMITTED.read_bytes())

    queues = _queues(pika.URLParameters(broker_url).virtual_host)
    for name in (ANALYZE.queue_for("x86_64"), MIRROR_BUILD.queue_for()):
        assert queues[name] == {"type": "quorum", "policy": COMMAND_POLICY}
    for name in (ANALYZE.dead_letter_queue_for("x86_64"), MIRROR_BUILD.dead_letter_queue_for()):
        assert queues[name] == {"type": "quorum", "policy": ""}
    for seconds in load_settings(AdminConfig, {}).mirror.retry_delays:
        assert queues[wait_queue(seconds)] == {"type": "classic", "policy": ""}
    assert queues[ANALYZER_BUILD_SYNCED.queue_for()] == {
        "type": "quorum",
        "policy": SUBSCRIPTION_POLICY,
    }
    policies = {p["name"]: p for p in _management(f"/api/policies/{vhost}")}
    assert policies[COMMAND_POLICY]["definition"]["delivery-limit"] == 3
    assert policies[SUBSCRIPTION_POLICY]["definition"] == {
        "max-length": 100_000,
        "overflow": "drop-head",
    }
    bindings = _management(f"/api/queues/{vhost}/{MIRROR_BUILD.queue_for()}/bindings")
    assert any(b["routing_key"] == MIRROR_BUILD.topic for b in bindings)

    # The services' own declarations agree with what was imported (no PRECONDITION_FAILED).
    connection = connect(broker_url)
    try:
        channel = connection.channel()
        declare_topology(channel, ("x86_64",))
        declare_wait_queues(channel, load_settings(AdminConfig, {}).mirror.retry_delays)
    finally:
        connection.close()


def test_an_unread_subscription_keeps_only_its_newest_events(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    broker_url = make_broker_url()
    settings = load_settings(AdminConfig, {})
    config = f'[broker]\nurl = "{broker_url}"\nsubscription_max_length = 3\n'
    _admin(tmp_path, config, "topology")
    done = _admin(tmp_path, config, "policies")
    assert f"{SUBSCRIPTION_POLICY} applied to queues matching" in done.stdout
    assert policy_problem(settings.broker.management_url, broker_url) is None
    # The broker applies a policy to its queues a moment after it is set.
    vhost_name = pika.URLParameters(broker_url).virtual_host
    deadline = time.monotonic() + 30
    while _queues(vhost_name)[ANALYZER_BUILD_SYNCED.queue_for()]["policy"] != SUBSCRIPTION_POLICY:
        assert time.monotonic() < deadline, "the subscription policy never reached its queue"
        time.sleep(0.2)

    publisher = Publisher(broker_url)
    try:
        for build_id in range(1, 8):
            event = BuildSyncedV1(
                build_id=build_id, nvr=f"crasher-1.0-{build_id}.fc40", os_release="fedora-40"
            )
            publisher.publish(BUILD_SYNCED, event)
    finally:
        publisher.close()
    connection = connect(broker_url)
    try:
        channel = connection.channel()
        kept = []
        while True:
            method, _, body = channel.basic_get(ANALYZER_BUILD_SYNCED.queue_for(), auto_ack=True)
            if method is None or body is None:
                break
            kept.append(parse(BuildSyncedV1, body).build_id)
    finally:
        connection.close()
    assert kept == [5, 6, 7]

    vhost = urllib.parse.quote(pika.URLParameters(broker_url).virtual_host, safe="")
    _management(f"/api/policies/{vhost}/{SUBSCRIPTION_POLICY}", "DELETE")
    problem = policy_problem(settings.broker.management_url, broker_url)
    assert problem is not None
    assert f"no '{SUBSCRIPTION_POLICY}' policy" in problem
