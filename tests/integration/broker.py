"""Faults for the real RabbitMQ: close every connection of a vhost, as an operator or a
broker restart would (through the management API, as the fault probes did)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pika

MANAGEMENT = "http://127.0.0.1:15672"


def _request(broker_url: str, method: str, path: str) -> bytes:
    params = pika.URLParameters(broker_url)
    credentials = params.credentials
    user = getattr(credentials, "username", "guest")
    password = getattr(credentials, "password", "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{MANAGEMENT}{path}",
        method=method,
        headers={"Authorization": f"Basic {token}", "X-Reason": "fault injection by a test"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        data: bytes = answer.read()
    return data


def connections_of(broker_url: str) -> list[str]:
    """The names of the vhost's open AMQP connections."""
    vhost = urllib.parse.quote(pika.URLParameters(broker_url).virtual_host, safe="")
    listed = json.loads(_request(broker_url, "GET", f"/api/vhosts/{vhost}/connections"))
    return [c["name"] for c in listed]


def close_connections(broker_url: str, at_least: int = 1, timeout: float = 20) -> int:
    """Close every connection of the vhost; return how many were closed.

    The management API lists a new connection only after its next statistics
    round (every few seconds): wait until it lists ``at_least`` of them.
    """
    deadline = time.monotonic() + timeout
    names = connections_of(broker_url)
    while len(names) < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        names = connections_of(broker_url)
    closed = 0
    for name in names:
        try:
            _request(broker_url, "DELETE", f"/api/connections/{urllib.parse.quote(name, safe='')}")
            closed += 1
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # gone already
                raise
    return closed
