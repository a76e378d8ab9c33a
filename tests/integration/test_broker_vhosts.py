"""The tests' private vhosts on the real RabbitMQ: usable when made, gone when deleted."""

from __future__ import annotations

import re
import urllib.error
from typing import cast

import pika
import pika.exceptions
import pytest

from tests.integration.broker import BROKER, Vhosts, _request

pytestmark = pytest.mark.integration


def _exists(url: str) -> bool:
    vhost = pika.URLParameters(url).virtual_host
    try:
        _request(BROKER, "GET", f"/api/vhosts/{vhost}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise
    return True


def test_a_made_vhost_carries_messages_and_is_gone_once_deleted() -> None:
    vhosts = Vhosts()
    url = vhosts.make()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.queue_declare("probe")
        channel.basic_publish("", "probe", b"hello")
        _, _, body = channel.basic_get("probe", auto_ack=True)
        connection.close()
        assert cast(object, body) == b"hello"  # pika's stubs say str; it is bytes
    finally:
        vhosts.delete()
    assert not _exists(url)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(url))
    vhosts.delete()  # nothing left to delete: harmless


def test_a_kept_vhost_outlives_the_others_until_asked() -> None:
    vhosts = Vhosts()
    kept, made = vhosts.make(keep=True), vhosts.make()
    try:
        vhosts.delete()
        assert (_exists(kept), _exists(made)) == (True, False)
    finally:
        vhosts.delete(kept=True)
    assert not _exists(kept)


def test_an_unreachable_management_api_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A port nothing listens on, as when the management plugin is not enabled.
    monkeypatch.setattr("tests.integration.broker.MANAGEMENT", "http://127.0.0.1:9")
    named = re.escape("management API at http://127.0.0.1:9 does not answer")
    with pytest.raises(RuntimeError, match=named):
        Vhosts().make()
