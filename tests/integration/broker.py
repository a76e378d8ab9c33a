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


def close_connections(broker_url: str, at_least: int = 1, timeout: float = 30) -> int:
    """Close every connection of the vhost; return how many were closed.

    The management API lists a new connection only after its next statistics round
    (every few seconds), and a closed one a little after it went: keep listing and
    closing until ``at_least`` were really closed, or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    closed = 0
    while True:
        for name in connections_of(broker_url):
            try:
                path = f"/api/connections/{urllib.parse.quote(name, safe='')}"
                _request(broker_url, "DELETE", path)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # gone already
                    raise
            else:
                closed += 1
        if closed >= at_least or time.monotonic() > deadline:
            return closed
        time.sleep(0.5)
