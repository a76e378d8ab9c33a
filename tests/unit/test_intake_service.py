"""The intake's service endpoints: settings, checkpackage, delete, metrics, health, HTTPS.

The broker probe is a fake here; tests/integration/test_intake_http.py checks the
heartbeat with the real RabbitMQ, up and unreachable.
"""

# The shared fixtures are imported from test_intake.py, and pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import falcon.testing
from prometheus_client.parser import text_string_to_metric_families

from services.common.data.intake import TaskStatus
from services.common.data.mirror import Nevra
from services.intake.catalog import RateLimiter
from services.intake.metrics import Metrics
from tests.data import Data
from tests.unit.test_intake import (
    XZ,
    Intake,
    MakeIntake,
    archive,
    crash_files,
    intake,  # noqa: F401 -- a fixture
    make_intake,  # noqa: F401 -- a fixture
)


def mirror(
    store: Data, name: str, release: str, arch: str, os_release: str, source: str | None = None
) -> None:
    nevra = Nevra(name, 0, "1.0", release, arch)
    digest = str(nevra).ljust(64, "0")[:64]
    store.mirror.add_package(nevra, os_release, f"p/{nevra}.rpm", digest, 1, [], source_nvr=source)


def test_settings_list_limits_formats_and_the_releases_as_abrts_client_spells_them(
    make_intake: MakeIntake,
) -> None:
    intake = make_intake(arches=["x86_64", "i686"], releases=["fedora-39", "fedora-41"], rawhide=42)
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")
    mirror(intake.store, "crasher", "1.fc40", "i686", "fedora-40")
    mirror(intake.store, "crasher", "1.fc41", "aarch64", "fedora-41")  # no analyzer takes it
    mirror(intake.store, "crasher", "1.fc42", "x86_64", "fedora-42")  # Rawhide ...
    mirror(intake.store, "crasher", "1.fc43", "x86_64", "fedora-43")  # ... and so is this
    mirror(intake.store, "data", "1.fc38", "noarch", "fedora-38")  # names no architecture
    text = intake.client.simulate_get("/settings").text
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    releases = (
        "fedora-rawhide-x86_64 fedora-41-x86_64 fedora-41-i386 fedora-40-x86_64 "
        "fedora-40-i386 fedora-39-x86_64 fedora-39-i386"
    )
    assert lines == {
        "running_tasks": "0",
        "max_running_tasks": "20",
        "max_packed_size": "50",
        "max_unpacked_size": "1024",
        "supported_formats": "application/x-xz-compressed-tar application/x-gzip "
        "application/x-tar application/zstd",
        "supported_releases": releases,
    }
    answer = intake.client.simulate_get("/settings", headers={"Accept": "application/json"})
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json["supported_releases"] == releases.split()
    assert answer.json["max_running_tasks"] == 20


def test_settings_offer_the_newest_32_releases_the_client_reads(make_intake: MakeIntake) -> None:
    intake = make_intake(releases=[f"fedora-{n}" for n in range(1, 41)])
    text = intake.client.simulate_get("/settings").text
    offered = dict(line.split(" ", 1) for line in text.splitlines())["supported_releases"].split()
    assert offered == [f"fedora-{n}-x86_64" for n in range(40, 8, -1)]


def check(
    intake: Intake, nvr: str, arch: str, os_release: str | None = None
) -> falcon.testing.Result:
    """``GET /checkpackage`` with exactly the headers abrt-retrace-client sends."""
    headers = {"X-Package-NVR": nvr, "X-Package-Arch": arch, "Accept-Charset": "UTF-8"}
    if os_release is not None:
        headers["X-OS-Release"] = os_release
    return intake.client.simulate_get("/checkpackage", headers=headers)


def test_checkpackage_is_a_bare_302_when_the_mirror_has_the_build(intake: Intake) -> None:
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")
    found = check(intake, "crasher-1.0-1.fc40", "x86_64")
    assert found.status_code == 302
    assert "Location" not in found.headers
    assert check(intake, "crasher-0:1.0-1.fc40", "x86_64").status_code == 302
    assert check(intake, "crasher-1.0-1.fc40", "aarch64").status_code == 404
    assert check(intake, "crasher-2.0-1.fc40", "x86_64").status_code == 404
    assert check(intake, "crasher", "x86_64").status_code == 400
    assert intake.client.simulate_get("/checkpackage").status_code == 400
    assert intake.publisher.sent == []  # no mirror to ask: nothing requested


def test_checkpackage_looks_in_the_release_the_client_names(make_intake: MakeIntake) -> None:
    intake = make_intake(arches=["x86_64", "i686"])
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")
    mirror(intake.store, "crasher", "1.fc40", "i686", "fedora-40")
    assert check(intake, "crasher-1.0-1.fc40", "x86_64", "fedora-40-x86_64").status_code == 302
    assert check(intake, "crasher-1.0-1.fc40", "x86_64", "fedora-41-x86_64").status_code == 404
    # An i686 machine: the client says i386 in its release, its architecture as uname has it.
    for arch in ("i686", "i386"):
        assert check(intake, "crasher-1.0-1.fc40", arch, "fedora-40-i386").status_code == 302
    assert check(intake, "crasher-1.0-1.fc40", "i686", "fedora-41-i386").status_code == 404
    bad = check(intake, "crasher-1.0-1.fc40", "x86_64", "Fedora 40")
    assert bad.status_code == 400
    assert "X-OS-Release" in bad.text


def test_checkpackage_refuses_a_machine_no_analyzer_takes(intake: Intake) -> None:
    mirror(intake.store, "crasher", "1.fc40", "i686", "fedora-40")
    answer = check(intake, "crasher-1.0-1.fc40", "i686", "fedora-40-i386")
    assert answer.status_code == 404
    assert "x86_64 machines, not i386" in answer.text
    # Without a release the machine is not known: the package is there.
    assert check(intake, "crasher-1.0-1.fc40", "i686").status_code == 302


def test_checkpackage_finds_noarch_subpackages_and_builds_by_their_source(
    intake: Intake,
) -> None:
    mirror(intake.store, "foo-cli", "3.fc40", "x86_64", "fedora-40", source="foo-1.0-3.fc40")
    mirror(intake.store, "foo-data", "3.fc40", "noarch", "fedora-40", source="foo-1.0-3.fc40")
    mirror(intake.store, "bar-data", "1.fc40", "noarch", "fedora-40", source="bar-1.0-1.fc40")
    for nvr in ("foo-cli-1.0-3.fc40", "foo-1.0-3.fc40", "foo-data-1.0-3.fc40"):
        assert check(intake, nvr, "x86_64", "fedora-40-x86_64").status_code == 302, nvr
    # A noarch package matches any architecture; a build of only noarch ones too.
    assert check(intake, "bar-1.0-1.fc40", "aarch64").status_code == 302
    assert check(intake, "bar-data-1.0-1.fc40", "x86_64", "fedora-40-x86_64").status_code == 302
    assert check(intake, "foo-1.0-3.fc41", "x86_64").status_code == 404
    assert check(intake, "foo-1.0-3.fc40", "x86_64", "fedora-41-x86_64").status_code == 404


def test_checkpackage_takes_rawhide_as_the_releases_at_or_above_the_setting(
    make_intake: MakeIntake,
) -> None:
    intake = make_intake(rawhide=42)
    mirror(intake.store, "crasher", "1.fc43", "x86_64", "fedora-43")
    mirror(intake.store, "crasher", "1.fc41", "x86_64", "fedora-41")
    rawhide = "fedora-rawhide-x86_64"
    assert check(intake, "crasher-1.0-1.fc43", "x86_64", rawhide).status_code == 302
    assert check(intake, "crasher-1.0-1.fc41", "x86_64", rawhide).status_code == 404
    assert check(intake, "crasher-1.0-1.fc41", "x86_64", "fedora-41-x86_64").status_code == 302
    unnamed = make_intake()  # no setting names Rawhide
    mirror(unnamed.store, "crasher", "1.fc43", "x86_64", "fedora-43")
    answer = check(unnamed, "crasher-1.0-1.fc43", "x86_64", rawhide)
    assert answer.status_code == 404
    assert "does not retrace fedora-rawhide-x86_64" in answer.text


def test_checkpackage_is_rate_limited_per_client_address(make_intake: MakeIntake) -> None:
    intake = make_intake(
        checkpackage_limit=3, checkpackage_window_seconds=600, trusted_proxies=["127.0.0.1/32"]
    )
    mirror(intake.store, "crasher", "1.fc40", "x86_64", "fedora-40")

    def from_(address: str) -> falcon.testing.Result:
        headers = {
            "X-Package-NVR": "crasher-1.0-1.fc40",
            "X-Package-Arch": "x86_64",
            "X-Forwarded-For": address,
        }
        return intake.client.simulate_get("/checkpackage", headers=headers)

    assert [from_("203.0.113.5").status_code for _ in range(3)] == [302] * 3
    refused = from_("203.0.113.5")
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 600
    assert "203.0.113.5 asked about more than 3 packages" in refused.text
    assert from_("203.0.113.6").status_code == 302  # another client is not held up


def test_checkpackage_answers_404_in_time_when_the_mirror_does_not_answer(
    make_intake: MakeIntake,
) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        intake = make_intake(mirror_url=f"http://127.0.0.1:{port}", mirror_timeout_seconds=0.5)
        started = time.monotonic()
        answer = check(intake, "fresh-1.0-1.fc40", "x86_64", "fedora-40-x86_64")
        took = time.monotonic() - started
    assert answer.status_code == 404
    assert took < 3
    assert intake.publisher.sent == []


def test_rate_limiter_windows_end_and_idle_clients_are_forgotten() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 10, clock=lambda: now[0])
    assert [limiter.admit("a"), limiter.admit("a")] == [0, 0]
    now[0] = 4.0
    assert limiter.admit("a") == 6.0
    now[0] = 10.0
    assert limiter.admit("a") == 0
    for n in range(3000):
        limiter.admit(f"client-{n}")
    now[0] = 100.0  # every window so far has ended
    for n in range(1200):
        limiter.admit(f"late-{n}")
    assert len(limiter._windows) < 3000


def test_a_task_deleted_while_analyzed_never_gets_results(intake: Intake) -> None:
    created = intake.create(archive(crash_files()))
    task_id, password = created.headers["X-Task-Id"], created.headers["X-Task-Password"]
    # An analyzer has claimed it ...
    assert intake.store.intake.move_task(task_id, [TaskStatus.QUEUED], TaskStatus.RUNNING)
    answer = intake.client.simulate_delete(f"/{task_id}", headers={"X-Task-Password": password})
    assert answer.status_code == 204
    assert not intake.spool.task_dir(task_id).exists()
    # ... and its guarded finish, the only way results are recorded, now finds no row.
    assert not intake.store.intake.move_task(task_id, [TaskStatus.RUNNING], TaskStatus.SUCCESS)
    assert intake.store.intake.get_task(task_id) is None
    again = intake.client.simulate_get(f"/{task_id}", headers={"X-Task-Password": password})
    assert again.status_code == 404


def test_delete_needs_the_password(intake: Intake) -> None:
    task_id = intake.create(archive(crash_files())).headers["X-Task-Id"]
    answer = intake.client.simulate_delete(f"/{task_id}", headers={"X-Task-Password": "x" * 32})
    assert answer.status_code == 403
    assert intake.store.intake.get_task(task_id) is not None


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

    app = create_app(
        intake.settings,
        intake.store.intake,
        intake.store.mirror,
        intake.spool,
        intake.publisher,
        broker=broker,
    )
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
