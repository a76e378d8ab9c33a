"""Shared test fixtures: private RabbitMQ vhosts and the real crash fixtures."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.build import Fixtures, build_fixtures

BROKER = "amqp://guest:guest@127.0.0.1:5672"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def make_broker_url() -> Iterator[Callable[[], str]]:
    """Makes fresh vhosts on the local RabbitMQ, all deleted after the session.

    Tests never share queues with each other or with a running demo.
    """
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed: the integration tests need the local RabbitMQ")
    made: list[str] = []

    def make() -> str:
        vhost = f"retrace-test-{uuid.uuid4().hex[:12]}"
        _rabbitmqctl("add_vhost", vhost)
        made.append(vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return f"{BROKER}/{vhost}"

    yield make
    for vhost in made:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def broker_url(make_broker_url: Callable[[], str]) -> str:
    """One private vhost for the session's broker tests."""
    return make_broker_url()


@pytest.fixture(scope="session")
def crash_fixtures() -> Fixtures:
    """The real RPMs and kernel-written core of tests/fixtures, built once and cached."""
    return build_fixtures()
