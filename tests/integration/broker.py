"""The real RabbitMQ for tests, through its management API: private vhosts, and faults
(close every connection of a vhost, as an operator or a broker restart would)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika

MANAGEMENT = "http://127.0.0.1:15672"
BROKER = "amqp://guest:guest@127.0.0.1:5672"


def _request(
    broker_url: str,
    method: str,
    path: str,
    body: dict[str, str] | None = None,
    timeout: float = 10,
) -> bytes:
    params = pika.URLParameters(broker_url)
    credentials = params.credentials
    user = getattr(credentials, "username", "guest")
    password = getattr(credentials, "password", "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{MANAGEMENT}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json",
            "X-Reason": "made by a test",
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
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


class Vhosts:
    """Private vhosts on the local RabbitMQ, made and deleted through its management API.

    Not with ``rabbitmqctl``: run as root it is ``su rabbitmq -c …``, so a call that times
    out leaves its Erlang node behind, holding one of the few CLI distribution ports, and
    every later call fails. In the tests each vhost lives only as long as the module that
    made it (see conftest), so the broker holds a few test vhosts at a time, not all of a
    session's.
    """

    def __init__(self, prefix: str = "retrace-test") -> None:
        self.prefix = prefix
        self.made: list[str] = []
        self.kept: list[str] = []

    def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> None:
        try:
            _request(BROKER, method, path, body, timeout=60)
        except urllib.error.HTTPError as exc:
            if not (method == "DELETE" and exc.code == 404):
                raise RuntimeError(f"RabbitMQ refused {method} {path}: {exc}") from exc
        except OSError as exc:
            raise RuntimeError(
                f"RabbitMQ's management API at {MANAGEMENT} does not answer: {exc}"
            ) from exc

    def make(self, keep: bool = False) -> str:
        vhost = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        self._call("PUT", f"/api/vhosts/{vhost}")
        (self.kept if keep else self.made).append(vhost)
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        self._call("PUT", f"/api/permissions/{vhost}/guest", everything)
        return f"{BROKER}/{vhost}"

    def delete(self, *, kept: bool = False) -> None:
        """Delete the vhosts made without ``keep`` (with ``kept``, the others too)."""
        for made in (self.made, self.kept) if kept else (self.made,):
            while made:
                self._call("DELETE", f"/api/vhosts/{made.pop()}")
