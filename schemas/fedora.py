"""fedora-messaging ``Message`` classes for every message model of ours.

Registered under the ``fedora.messages`` entry point (pyproject.toml) with the
names our publishers put in the ``fedora_messaging_schema`` header, so
``fedora-messaging consume`` and any fedora-messaging consumer can read our
commands and events.  Each ``body_schema`` is the lenient (consumer) form of the
pydantic model: fedora-messaging validates every message it loads against it,
and a field added by a newer producer must not make an older reader drop it.

Only the Koji listener, this entry point and tests import fedora_messaging; our
services publish and consume with pika (services/common/bus.py).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from fedora_messaging import message as fm

from schemas import messages
from schemas.messages import consumer_schema
from schemas.topology import ANALYZE, BUILD_SYNCED, MIRROR_BUILD, TASK_FINISHED, Route


def _schema(route: Route) -> dict[str, Any]:
    schema = consumer_schema(route.model)
    schema.setdefault("$schema", "http://json-schema.org/draft-07/schema#")
    return schema


class RetraceMessage(fm.Message):
    """Common behaviour: the app name and a one-line summary for people reading a feed."""

    route: ClassVar[Route]

    @property
    def app_name(self) -> str:
        """The application that sent the message, as fedora-messaging tools show it."""
        return "retrace-server"

    @property
    def summary(self) -> str:
        """One line about the message."""
        fields = ", ".join(f"{k}={v}" for k, v in sorted(self.body.items()) if v is not None)
        return f"{self.route.model.__name__}: {fields}"

    def __str__(self) -> str:
        return self.summary

    def model(self) -> messages.Message:
        """The body parsed as our pydantic model (its lenient form)."""
        return messages.parse(self.route.model, json.dumps(self.body))


class AnalyzeTaskV1(RetraceMessage):
    """Command: retrace one crash (see :class:`schemas.messages.AnalyzeTaskV1`)."""

    route = ANALYZE
    topic = ANALYZE.topic.replace(".{arch}", "")
    body_schema: ClassVar[dict[str, Any]] = _schema(ANALYZE)


class TaskFinishedV1(RetraceMessage):
    """Event: a task reached a final state (see :class:`schemas.messages.TaskFinishedV1`)."""

    route = TASK_FINISHED
    topic = TASK_FINISHED.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(TASK_FINISHED)


class MirrorBuildV1(RetraceMessage):
    """Command: mirror or remove a Koji build (see :class:`schemas.messages.MirrorBuildV1`)."""

    route = MIRROR_BUILD
    topic = MIRROR_BUILD.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(MIRROR_BUILD)


class BuildSyncedV1(RetraceMessage):
    """Event: the mirror synced a Koji build (see :class:`schemas.messages.BuildSyncedV1`)."""

    route = BUILD_SYNCED
    topic = BUILD_SYNCED.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(BUILD_SYNCED)


CLASSES: tuple[type[RetraceMessage], ...] = (
    AnalyzeTaskV1,
    TaskFinishedV1,
    MirrorBuildV1,
    BuildSyncedV1,
)
"""One fedora-messaging class per message model of ours."""
