"""fedora-messaging ``Message`` classes for every message model of ours.

Needs the ``[fedora-messaging]`` extra of this distribution; :mod:`schemas.messages`
and :mod:`schemas.topology` do not.  The classes are registered under the
``fedora.messages`` entry point (schemas/pyproject.toml) with each model's stable
:attr:`~schemas.messages.Message.schema_name` (``retrace.task.finished.v1``), the
name our publishers put in the ``fedora_messaging_schema`` header, so
``fedora-messaging consume`` and any fedora-messaging consumer can read our
commands and events.  They follow Fedora's conventions for message classes
(``app_name``, ``summary``, ``__str__``, ``usernames``, ``packages``, ``url``).

Each ``body_schema`` is the lenient (consumer) form of the pydantic model:
fedora-messaging validates every message it loads against it, and a field added by
a newer producer must not make an older reader drop it.

Our services publish and consume with pika (services/common/bus.py); only the
mirror's Koji listener, this entry point and tests import fedora_messaging.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from fedora_messaging import message as fm

from schemas import messages
from schemas.messages import MirrorAction, Outcome, TaskType, consumer_schema
from schemas.topology import ANALYZE, BUILD_SYNCED, MIRROR_BUILD, TASK_FINISHED, Route


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _schema(route: Route) -> dict[str, Any]:
    schema = consumer_schema(route.model)
    schema.setdefault("$schema", "http://json-schema.org/draft-07/schema#")
    return schema


class RetraceMessage(fm.Message):
    """What every message of ours has in common, as Fedora's message classes have it."""

    route: ClassVar[Route]

    def model(self) -> messages.Message:
        """The body parsed as our pydantic model (its lenient form)."""
        return messages.parse(self.route.model, json.dumps(self.body))

    @property
    def app_name(self) -> str:
        """The application that sent the message, as fedora-messaging tools show it."""
        return "retrace-server"

    @property
    def summary(self) -> str:
        """One line about the message, like an e-mail's subject."""
        raise NotImplementedError

    def __str__(self) -> str:
        """The summary, then the whole body: what a notification or ``consume`` shows."""
        return f"{self.summary}\n\n{json.dumps(self.body, indent=2, sort_keys=True)}"

    @property
    def usernames(self) -> list[str]:
        """No one: a crash's submitter is anonymous and our services act on their own."""
        return []

    @property
    def packages(self) -> list[str]:
        """The RPM packages (builds) the message is about, by name."""
        try:
            return self.model().package_names()
        except ValueError:  # an invalid body is about nothing we can name
            return []

    @property
    def url(self) -> str | None:
        """None: a task is read only with its password, and a body names no public page."""
        return None


class AnalyzeTaskV1(RetraceMessage):
    """Command: retrace one crash (see :class:`schemas.messages.AnalyzeTaskV1`)."""

    route = ANALYZE
    topic = ANALYZE.topic.replace(".{arch}", "")
    body_schema: ClassVar[dict[str, Any]] = _schema(ANALYZE)

    def model(self) -> messages.AnalyzeTaskV1:
        """The body parsed as :class:`schemas.messages.AnalyzeTaskV1`."""
        return messages.parse(messages.AnalyzeTaskV1, json.dumps(self.body))

    @property
    def summary(self) -> str:
        """``Retrace task abcdefgh12 (x86_64) queued``, and how, where it matters."""
        task = self.model()
        kind = "Debug retrace task" if task.task_type is TaskType.DEBUG else "Retrace task"
        text = f"{kind} {task.task_id} ({task.arch}) queued"
        if task.fetch_attempt:
            text += f" again, after {_count(task.fetch_attempt, 'request')} to the mirror"
        return text


class TaskFinishedV1(RetraceMessage):
    """Event: a task reached a final state (see :class:`schemas.messages.TaskFinishedV1`)."""

    route = TASK_FINISHED
    topic = TASK_FINISHED.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(TASK_FINISHED)

    def model(self) -> messages.TaskFinishedV1:
        """The body parsed as :class:`schemas.messages.TaskFinishedV1`."""
        return messages.parse(messages.TaskFinishedV1, json.dumps(self.body))

    @property
    def summary(self) -> str:
        """``Retrace task … succeeded: the crash is in main (/usr/bin/foo)``, or why it failed."""
        task = self.model()
        text = f"Retrace task {task.task_id} ({task.arch})"
        if task.outcome is Outcome.FAILURE:
            return f"{text} failed: {task.reason}" if task.reason else f"{text} failed"
        if task.crash_function:
            where = f" ({task.crash_module})" if task.crash_module else ""
            return f"{text} succeeded: the crash is in {task.crash_function}{where}"
        return f"{text} succeeded"


class MirrorBuildV1(RetraceMessage):
    """Command: mirror or remove a Koji build (see :class:`schemas.messages.MirrorBuildV1`)."""

    route = MIRROR_BUILD
    topic = MIRROR_BUILD.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(MIRROR_BUILD)

    def model(self) -> messages.MirrorBuildV1:
        """The body parsed as :class:`schemas.messages.MirrorBuildV1`."""
        return messages.parse(messages.MirrorBuildV1, json.dumps(self.body))

    @property
    def summary(self) -> str:
        """``Mirror Koji build bash-5.2-1.fc40 (asked by listener)``."""
        command = self.model()
        verb = "Mirror" if command.action is MirrorAction.MIRROR else "Remove from the mirror"
        return f"{verb} Koji build {command.build} (asked by {command.requested_by})"


class BuildSyncedV1(RetraceMessage):
    """Event: the mirror synced a Koji build (see :class:`schemas.messages.BuildSyncedV1`)."""

    route = BUILD_SYNCED
    topic = BUILD_SYNCED.topic
    body_schema: ClassVar[dict[str, Any]] = _schema(BUILD_SYNCED)

    def model(self) -> messages.BuildSyncedV1:
        """The body parsed as :class:`schemas.messages.BuildSyncedV1`."""
        return messages.parse(messages.BuildSyncedV1, json.dumps(self.body))

    @property
    def summary(self) -> str:
        """``The mirror synced bash-5.2-1.fc40 (Koji build 42, fedora-40): …``."""
        build = self.model()
        where = f"{build.nvr} (Koji build {build.build_id}, {build.os_release})"
        packages = _count(len(build.packages), "package")
        if build.action is MirrorAction.REMOVE:
            return f"The mirror removed {where}: {packages}"
        return f"The mirror synced {where}: {packages}, {_count(build.new_files, 'new file')}"


CLASSES: tuple[type[RetraceMessage], ...] = (
    AnalyzeTaskV1,
    TaskFinishedV1,
    MirrorBuildV1,
    BuildSyncedV1,
)
"""One fedora-messaging class per message model of ours, registered under its
``schema_name``."""


# The names the server published before schema names were stable (``module:Class``)
# load as these, for one release: distinct classes, so that fedora-messaging maps each
# class back to one name (it publishes ours under the stable one), and marked
# deprecated, so that fedora-messaging warns whoever still receives them.


class LegacyAnalyzeTaskV1(AnalyzeTaskV1):
    """``schemas.messages:AnalyzeTaskV1``: the old name of ``retrace.analyze.v1``."""

    deprecated = True


class LegacyTaskFinishedV1(TaskFinishedV1):
    """``schemas.messages:TaskFinishedV1``: the old name of ``retrace.task.finished.v1``."""

    deprecated = True


class LegacyMirrorBuildV1(MirrorBuildV1):
    """``schemas.messages:MirrorBuildV1``: the old name of ``retrace.mirror.build.v1``."""

    deprecated = True


class LegacyBuildSyncedV1(BuildSyncedV1):
    """``schemas.messages:BuildSyncedV1``: the old name of ``retrace.mirror.build.synced.v1``."""

    deprecated = True


LEGACY_CLASSES: tuple[type[RetraceMessage], ...] = (
    LegacyAnalyzeTaskV1,
    LegacyTaskFinishedV1,
    LegacyMirrorBuildV1,
    LegacyBuildSyncedV1,
)
"""The classes of the old ``module:Class`` names (:func:`schemas.messages.legacy_schema_name`),
in the order of :data:`CLASSES`; remove in the release after this one."""


def registered_names() -> dict[str, type[RetraceMessage]]:
    """Every name the ``fedora.messages`` entry point must register, with its class."""
    names: dict[str, type[RetraceMessage]] = {}
    for current, legacy in zip(CLASSES, LEGACY_CLASSES, strict=True):
        names[current.route.model.schema_name] = current
        names[messages.legacy_schema_name(legacy.route.model)] = legacy
    return names
