"""The intake's service endpoints: settings, checkpackage, delete, metrics, health, HTTPS.

The broker probe is a fake here; tests/integration/test_intake_http.py checks the
heartbeat with the real RabbitMQ, up and unreachable.
"""

# The shared fixtures are imported from test_intake.py, and pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

from dataclasses import dataclass

import falcon.testing
from prometheus_client.parser import text_string_to_metric_families

from services.common.store import Nevra, Store, TaskStatus
from services.intake.metrics import Metrics
from tests.unit.test_intake import (
    XZ,
    Intake,
    MakeIntake,
    archive,
    crash_files,
    intake,  # noqa: F401 -- a fixture
    make_intake,  # noqa: F401 -- a fixture
)


def mirror(store: Store, name: str, release: str, arch: str, os_release: str) -> None:
    nevra = Nevra(name, 0, "1.0", release, arch)
    store.add_package(nevra, os_release, f"p/{nevra}.rpm", str(nevra).ljust(64, "0")[:64], 1, [])


def test_settings_list_limits_formats_and_the_mirrors_releases(intake: Intake) -> None:
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")
    mirror(intake.store, "crasher", "1.fc41", "aarch64", "fedora-41")
    mirror(intake.store, "data", "1.fc40", "noarch", "fedora-40")
    text = intake.client.simulate_get("/settings").text
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    assert lines == {
        "running_tasks": "0",
        "max_running_tasks": "20",
        "max_packed_size": "50",
        "max_unpacked_size": "1024",
        "supported_formats": "application/x-xz-compressed-tar application/x-gzip "
        "application/x-tar application/zstd",
        "supported_releases": "fedora-40-x86_64 fedora-41-aarch64",
    }
    answer = intake.client.simulate_get("/settings", headers={"Accept": "application/json"})
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json["supported_releases"] == ["fedora-40-x86_64", "fedora-41-aarch64"]
    assert answer.json["max_running_tasks"] == 20


def test_checkpackage_is_a_bare_302_when_the_mirror_has_the_build(intake: Intake) -> None:
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")

    def check(nvr: str, arch: str) -> falcon.testing.Result:
        headers = {"X-Package-NVR": nvr, "X-Package-Arch": arch}
        return intake.client.simulate_get("/checkpackage", headers=headers)

    found = check("crasher-1.0-1.fc40", "x86_64")
    assert found.status_code == 302
    assert "Location" not in found.headers
    assert check("crasher-1.0-1.fc40", "aarch64").status_code == 404
    assert check("crasher-2.0-1.fc40", "x86_64").status_code == 404
    assert check("crasher", "x86_64").status_code == 400
    assert intake.client.simulate_get("/checkpackage").status_code == 400


def test_a_task_deleted_while_analyzed_never_gets_results(intake: Intake) -> None:
    created = intake.create(archive(crash_files()))
    task_id, password = created.headers["X-Task-Id"], created.headers["X-Task-Password"]
    # An analyzer has claimed it ...
    assert intake.store.move_task(task_id, [TaskStatus.QUEUED], TaskStatus.RUNNING)
    answer = intake.client.simulate_delete(f"/{task_id}", headers={"X-Task-Password": password})
    assert answer.status_code == 204
    assert not intake.spool.task_dir(task_id).exists()
    # ... and its guarded finish, the only way results are recorded, now finds no row.
    assert not intake.store.move_task(task_id, [TaskStatus.RUNNING], TaskStatus.SUCCESS)
    assert intake.store.get_task(task_id) is None
    again = intake.client.simulate_get(f"/{task_id}", headers={"X-Task-Password": password})
    assert again.status_code == 404


def test_delete_needs_the_password(intake: Intake) -> None:
    task_id = intake.create(archive(crash_files())).headers["X-Task-Id"]
    answer = intake.client.simulate_delete(f"/{task_id}", headers={"X-Task-Password": "x" * 32})
    assert answer.status_code == 403
    assert intake.store.get_task(task_id) is not None


def test_odd_task_ids_are_unknown_tasks(intake: Intake) -> None:
    for task_id in ("%00", "a%0ab", "x" * 500, "%C3%A9"):
        answer = intake.client.simulate_get(f"/{task_id}", headers={"X-Task-Password": "p"})
        assert answer.status_code == 404


def test_metrics_count_requests_refusals_and_tasks_all_declared(make_intake: MakeIntake) -> None:
    intake = make_intake()
    intake.create(archive(crash_files()))
    intake.create(b"junk", "application/zip")
    intake.client.simulate_get("/settings")
    text = intake.client.simulate_get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    declared = Metrics().names() | {"retrace_intake_tasks", "retrace_intake_queue_depth"}
    declared |= {"retrace_intake_spool_free_bytes"}
    # A counter also exports when it was created, under its own name plus "_created".
    assert {name.removesuffix("_created") for name in families} <= declared
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    route = (("method", "POST"), ("route", "/create"))
    assert samples[("retrace_intake_requests_total", (*route, ("status", "201")))] == 1
    assert samples[("retrace_intake_requests_total", (*route, ("status", "415")))] == 1
    assert samples[("retrace_intake_refused_uploads_total", (("reason", "content_type"),))] == 1
    assert samples[("retrace_intake_tasks", (("state", "queued"),))] == 1
    assert samples[("retrace_intake_received_bytes_total", ())] > 0
    assert samples[("retrace_intake_spool_free_bytes", ())] > 0


@dataclass
class FakeBroker:
    up: bool = True

    def check(self) -> None:
        if not self.up:
            raise ConnectionRefusedError("refused")

    def queue_depth(self) -> int | None:
        return 3 if self.up else None


def heartbeat_app(intake: Intake, broker: FakeBroker) -> falcon.testing.TestClient:
    from services.intake.app import create_app

    app = create_app(intake.settings, intake.store, intake.spool, intake.publisher, broker=broker)
    return falcon.testing.TestClient(app)


def test_the_heartbeat_names_the_failing_part(intake: Intake) -> None:
    broker = FakeBroker()
    client = heartbeat_app(intake, broker)
    healthy = client.simulate_get("/__heartbeat__")
    assert healthy.status_code == 200
    assert healthy.json["checks"] == {"database": "ok", "broker": "ok", "spool": "ok"}
    broker.up = False
    sick = client.simulate_get("/__heartbeat__")
    assert sick.status_code == 503
    assert sick.json["checks"]["broker"] == "the broker does not answer"
    assert sick.json["checks"]["database"] == "ok"
    assert client.simulate_get("/__lbheartbeat__").status_code == 200


def test_the_heartbeat_fails_on_a_full_spool(make_intake: MakeIntake) -> None:
    intake = make_intake(min_free_space_mib=1 << 40)
    client = heartbeat_app(intake, FakeBroker())
    answer = client.simulate_get("/__heartbeat__")
    assert answer.status_code == 503
    assert "less than" in answer.json["checks"]["spool"]


def test_version_and_openapi_are_served(intake: Intake) -> None:
    version = intake.client.simulate_get("/__version__").json
    assert version["name"] == "retrace-server"
    assert version["version"]
    spec = intake.client.simulate_get("/openapi.json").json
    assert {"/create", "/{task_id}", "/{task_id}/log", "/{task_id}/backtrace"} <= set(spec["paths"])
    create_answers = spec["paths"]["/create"]["post"]["responses"]
    for code in ("201", "400", "403", "408", "409", "411", "413", "415", "429", "503", "507"):
        assert code in create_answers


def test_require_https_refuses_plain_http_but_believes_a_trusted_proxy(
    make_intake: MakeIntake,
) -> None:
    intake = make_intake(require_https=True, trusted_proxies=["127.0.0.1/32"])
    plain = intake.client.simulate_get("/settings")
    assert plain.status_code == 403
    assert "HTTPS" in plain.text
    proxied = intake.client.simulate_get("/settings", headers={"X-Forwarded-Proto": "https"})
    assert proxied.status_code == 200
    # A client that is not our proxy cannot claim HTTPS for itself.
    forged = intake.client.simulate_get(
        "/settings", headers={"X-Forwarded-Proto": "https"}, remote_addr="198.51.100.9"
    )
    assert forged.status_code == 403
    assert intake.client.simulate_get("/__lbheartbeat__").status_code == 200
    upload = intake.client.simulate_post(
        "/create",
        body=archive(crash_files()),
        headers={"Content-Type": XZ, "X-Forwarded-Proto": "https"},
    )
    assert upload.status_code == 201


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(make_intake: MakeIntake) -> None:
    intake = make_intake(trusted_proxies=["127.0.0.1/32"], wrong_password_limit=1)
    task_id = intake.create(archive(crash_files())).headers["X-Task-Id"]

    def wrong(forwarded_for: str) -> int:
        headers = {"X-Task-Password": "x" * 32, "X-Forwarded-For": forwarded_for}
        return intake.client.simulate_get(f"/{task_id}", headers=headers).status_code

    assert [wrong("203.0.113.1"), wrong("203.0.113.1")] == [403, 429]
    # Another client behind the same proxy has a count of its own.
    assert wrong("203.0.113.2") == 403
