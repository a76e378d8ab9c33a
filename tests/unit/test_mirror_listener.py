"""The Koji listener's decisions, and fedora-messaging's configuration built from ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fedora_messaging import config as fm_config
from koji_fedoramessaging_messages.build import BuildStateChangeV1

from schemas.messages import MirrorAction, MirrorBuildV1
from services.common.settings import MirrorConfig
from services.mirror.http import render_metrics
from services.mirror.listener import BuildListener, configure_fedora_messaging

# As Koji's fedora-messaging plugin sends it (fields trimmed to the schema's required ones).
COMPLETED: dict[str, Any] = {
    "name": "bash",
    "version": "5.2.26",
    "release": "3.fc40",
    "epoch": None,
    "attribute": "state",
    "old": 0,
    "new": 1,
    "build_id": 2450123,
    "task_id": 118000000,
    "task": None,
    "request": None,
    "owner": "releng",
    "instance": "primary",
    "creation_time": "2024-05-01T10:00:00+00:00",
    "completion_time": "2024-05-01T10:20:00+00:00",
}


def decide(settings: MirrorConfig, **changes: Any) -> tuple[MirrorBuildV1 | None, str]:
    sent: list[MirrorBuildV1] = []
    listener = BuildListener(settings, sent.append)
    message = BuildStateChangeV1(
        topic="org.fedoraproject.prod.buildsys.build.state.change",
        body={**COMPLETED, **changes},
    )
    message.validate()
    listener(message)
    command, why = listener.command_for(message.body)
    assert [(c.build, c.action) for c in sent] == (
        [(command.build, command.action)] if command else []
    )
    return command, why


def settings(tmp_path: Path, **mirror: Any) -> MirrorConfig:
    return MirrorConfig(home=tmp_path, mirror=mirror)  # type: ignore[arg-type]


def test_a_completed_build_becomes_a_mirror_command(tmp_path: Path) -> None:
    command, _ = decide(settings(tmp_path))
    assert command is not None
    assert command.build == 2450123
    assert command.action == MirrorAction.MIRROR


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"new": 0, "old": None}, "its new state is BUILDING"),
        ({"new": 3}, "its new state is FAILED"),
        ({"new": 4}, "its new state is CANCELED"),
        ({"attribute": "owner"}, "a change of 'owner', not of the state"),
        ({"instance": "s390"}, "from Koji instance 's390'"),
        ({"new": 2, "old": 1}, "deleted, but mirror.delete_on_deleted is off"),
    ],
)
def test_everything_else_is_ignored(tmp_path: Path, changes: dict[str, Any], why: str) -> None:
    assert decide(settings(tmp_path), **changes) == (None, why)


def test_a_deleted_build_is_removed_only_where_configured(tmp_path: Path) -> None:
    command, _ = decide(settings(tmp_path, delete_on_deleted=True), new=2, old=1)
    assert command is not None
    assert command.action == MirrorAction.REMOVE


def test_package_and_release_filters(tmp_path: Path) -> None:
    assert decide(settings(tmp_path, packages=["glibc"]))[0] is None
    assert decide(settings(tmp_path, packages=["bash"]))[0] is not None
    assert decide(settings(tmp_path, releases=["fedora-41"]))[0] is None
    assert decide(settings(tmp_path, releases=["fedora-40"]))[0] is not None


def test_fedora_messaging_is_configured_from_our_settings(tmp_path: Path) -> None:
    ours = settings(
        tmp_path,
        koji_broker_url="amqps://fedora:@broker.example/%2Fpublic_pubsub",
        koji_broker_ca_cert="certs/ca.pem",
        koji_topic_prefix="org.fedoraproject.stg",
        koji_queue="00000000-retrace",
    )
    configure_fedora_messaging(ours)
    conf = fm_config.conf
    assert conf["amqp_url"] == "amqps://fedora:@broker.example/%2Fpublic_pubsub"
    assert conf["tls"]["ca_cert"] == str(tmp_path / "certs/ca.pem")
    assert conf["bindings"] == [
        {
            "queue": "00000000-retrace",
            "exchange": "amq.topic",
            "routing_keys": ["org.fedoraproject.stg.buildsys.build.state.change"],
        }
    ]
    assert conf["queues"]["00000000-retrace"]["durable"] is True


def test_an_undeclared_metric_is_refused() -> None:
    assert "retrace_mirror_packages 3" in render_metrics([("retrace_mirror_packages", {}, 3)])
    with pytest.raises(KeyError):
        render_metrics([("retrace_mirror_surprise", {}, 1)])
