"""The README's architecture diagram is drawn from the code, and the code keeps to it.

The README block must be what ``retrace-admin architecture`` draws today (as
deploy/rabbitmq/definitions.json must be what ``retrace-admin topology --export``
writes); the drawing must show every route, subscription, wait route, table and shared
folder; and each service's declaration must name exactly what its code publishes,
consumes, parks and uses (read from the service's source), so neither can drift.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from schemas import topology
from schemas.messages import BuildSyncedV1, MirrorBuildV1
from schemas.topology import (
    ANALYZE,
    BUILD_SYNCED,
    MIRROR_BUILD,
    MIRROR_WAIT,
    Route,
    WaitRoute,
)
from services.common import admin, architecture
from services.common.architecture import SERVICES, Service, tables_of
from services.common.bus import Consumer, Publisher, UndeclaredRoute
from services.common.data import schema
from services.common.settings import PathSettings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REGENERATE = "retrace-admin architecture --readme README.md"

TOPOLOGY_OBJECTS = {
    name: value
    for name, value in vars(topology).items()
    if isinstance(value, Route | WaitRoute) or name == "KOJI_BUILD_TOPIC"
}
"""What a service's code may name from schemas.topology that its declaration must show."""
VERBS = {
    "publish": "publishes",
    "_publish": "publishes",
    "dead_letter": "publishes",  # a command given up on, sent to its dead letters
    "later": "waits",
    "_later": "waits",
    "publish_later": "waits",
    "subscribe": "consumes",
}
"""Call → relation, for a route passed as the call's first argument."""


def test_the_readme_diagram_is_current() -> None:
    assert architecture.current_block(README.read_text()) == architecture.readme_block(), (
        f"README.md's architecture diagram is stale: regenerate it with '{REGENERATE}'"
    )


def test_the_diagram_shows_every_route_subscription_wait_route_and_table() -> None:
    routes = [value for value in vars(topology).values() if isinstance(value, Route)]
    assert set(routes) == {*topology.ROUTES, *topology.SUBSCRIPTIONS}, (
        "a route of schemas/topology.py is in neither ROUTES nor SUBSCRIPTIONS"
    )
    waits = [value for value in vars(topology).values() if isinstance(value, WaitRoute)]
    assert set(waits) == set(topology.WAITS), "a wait route is missing from topology.WAITS"
    shown = _label_lines(architecture.mermaid())
    for route in routes:
        assert route.topic_for("{arch}") in shown
        if route.queue is not None:
            assert route.queue_for("{arch}") in shown
        if route.command:
            assert route.dead_letter_queue_for("{arch}") in shown
    for wait in topology.WAITS:
        assert wait.queue in shown
    assert {topology.EXCHANGE, topology.DEAD_LETTER_EXCHANGE} <= shown
    assert any(line.endswith(topology.KOJI_BUILD_TOPIC) for line in shown)
    owners = {path.stem for path in (ROOT / "services/common/data").glob("*.py")} & {
        path.name for path in (ROOT / "services/common/data/migrations").iterdir()
    }
    assert owners == {branch.name for branch in schema.ORDER}
    tables = [table for branch in schema.ORDER for table in tables_of(branch)]
    assert len(tables) == 9
    assert set(tables) <= shown
    for folder in PathSettings.model_fields:
        assert f"[paths] {folder}" in shown


def _label_lines(diagram: str) -> set[str]:
    """Every line of every label of ``diagram``."""
    return {line for label in re.findall(r'"([^"]*)"', diagram) for line in label.split("<br/>")}


def test_every_route_has_a_sender_and_every_queue_a_consumer() -> None:
    def every(relation: str) -> set[Route | WaitRoute]:
        return {r for s in SERVICES for r in getattr(s.bus, relation)}

    assert set(topology.ROUTES) <= every("publishes")
    assert {r for r in (*topology.ROUTES, *topology.SUBSCRIPTIONS) if r.queue} <= every("consumes")
    assert {r for r in topology.ROUTES if r.command} == every("dead_letters")
    assert set(topology.WAITS) == every("waits")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {s.command for s in SERVICES} <= set(scripts)


def _relations(package: Path) -> dict[str, set[str]]:
    """What the source of ``package`` does with topology names, owners' data and folders."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "schemas.topology":
                imported |= {n.asname or n.name for n in node.names if n.name in TOPOLOGY_OBJECTS}
            if isinstance(node, ast.ImportFrom) and node.module:
                prefix, _, owner = node.module.rpartition(".")
                if prefix == "services.common.data" and owner in schema.BRANCHES:
                    found["data"].add(owner)
            if isinstance(node, ast.Attribute) and node.attr in PathSettings.model_fields:
                found["folders"].add(node.attr)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in imported:
                found[_relation(node, parents.get(node))].add(node.id)
    return found


def _relation(node: ast.Name, parent: ast.AST | None) -> str:
    if node.id == "KOJI_BUILD_TOPIC":
        return "listens"
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
        function = parent.func
        called = function.attr if isinstance(function, ast.Attribute) else ""
        called = function.id if isinstance(function, ast.Name) else called
        return VERBS.get(called, "mentions")
    if isinstance(parent, ast.Attribute) and parent.attr == "dead_letter_queue_for":
        return "dead_letters"
    return "mentions"


def _declared(service: Service) -> dict[str, set[str]]:
    names = {id(value): name for name, value in TOPOLOGY_OBJECTS.items()}
    bus = service.bus
    return {
        "publishes": {names[id(r)] for r in bus.publishes},
        "waits": {names[id(w)] for w in bus.waits},
        "consumes": {names[id(r)] for r in bus.consumes},
        "dead_letters": {names[id(r)] for r in bus.dead_letters},
        "listens": {name for name, value in TOPOLOGY_OBJECTS.items() if value in service.listens},
        "data": {b.name for b in (service.owns, *service.uses)},
        "folders": set(service.folders),
    }


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_each_declaration_names_what_its_service_code_does(service: Service) -> None:
    found = _relations(ROOT / "services" / service.name)
    declared = _declared(service)
    for relation, names in declared.items():
        assert found[relation] == names, (
            f"services/{service.name}/ {relation} {sorted(found[relation])}, but its "
            f"declaration in services/common/architecture.py says {sorted(names)}"
        )
    assert found["mentions"] <= set().union(*declared.values())


def test_the_code_reading_finds_a_new_publish() -> None:
    found = _relations(ROOT / "services" / "intake")
    assert found["publishes"] == {"ANALYZE", "MIRROR_BUILD"}
    assert "ANALYZE" in found["mentions"]  # the heartbeat's look at the analyze queues


def test_a_publisher_refuses_a_route_its_role_does_not_name() -> None:
    # Refused before any connection is tried: the broker's address is never looked up.
    intake = Publisher("amqp://nowhere.invalid/", role=architecture.INTAKE.bus)
    event = BuildSyncedV1(build_id=1, nvr="crasher-1.0-1.fc40", os_release="fedora-40")
    with pytest.raises(UndeclaredRoute, match=re.escape("services/common/architecture.py")):
        intake.publish(BUILD_SYNCED, event)
    command = MirrorBuildV1(build=1, requested_by="test")
    with pytest.raises(UndeclaredRoute, match=re.escape(MIRROR_WAIT.queue)):
        intake.publish_later(MIRROR_WAIT, 15, command)
    new_route = Route(MirrorBuildV1, "retrace.new.v1", None, command=False)
    mirror = Publisher("amqp://nowhere.invalid/", role=architecture.MIRROR.bus)
    with pytest.raises(UndeclaredRoute, match=re.escape("publishing retrace.new.v1")):
        mirror.publish(new_route, command)
    with pytest.raises(UndeclaredRoute, match=re.escape("publishing retrace.new.v1")):
        mirror.dead_letter(Route(MirrorBuildV1, "retrace.new.v1", "q", command=True), command, {})


def _nothing(_body: bytes, _headers: dict[str, Any]) -> None:
    """A dead-letter handler that is never called."""


def test_a_consumer_refuses_a_queue_its_role_does_not_name() -> None:
    consumer = Consumer("amqp://nowhere.invalid/", 60, ("x86_64",), architecture.ANALYZER.bus)
    consumer.subscribe(ANALYZE, lambda _delivery: None)
    consumer.subscribe_dead_letters([ANALYZE.dead_letter_queue_for("x86_64")], _nothing)
    with pytest.raises(UndeclaredRoute, match=MIRROR_BUILD.topic):
        consumer.subscribe(MIRROR_BUILD, lambda _delivery: None)
    with pytest.raises(UndeclaredRoute):
        consumer.subscribe_dead_letters([MIRROR_BUILD.dead_letter_queue_for()], _nothing)
    # The mirror's worker has no arch: its queues have none either.
    mirror = Consumer("amqp://nowhere.invalid/", 60, (), architecture.MIRROR.bus)
    mirror.subscribe(MIRROR_BUILD, lambda _delivery: None)
    mirror.subscribe_dead_letters([MIRROR_BUILD.dead_letter_queue_for()], _nothing)
    with pytest.raises(UndeclaredRoute):
        mirror.subscribe_dead_letters([ANALYZE.dead_letter_queue_for("x86_64")], _nothing)


def test_the_admin_command_prints_and_redraws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert admin.main(["architecture"]) == 0
    assert capsys.readouterr().out == architecture.mermaid()
    readme = tmp_path / "README.md"
    stale = f"# x\n\n{architecture.BEGIN}\nold\n{architecture.END}\n\nrest\n"
    readme.write_text(stale)
    assert admin.main(["architecture", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"# x\n\n{architecture.readme_block()}\nrest\n"
    readme.write_text("# no markers\n")
    assert admin.main(["architecture", "--readme", str(readme)]) == 1
    assert "no architecture block" in capsys.readouterr().err
