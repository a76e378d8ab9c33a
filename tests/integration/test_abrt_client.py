"""The intake as ABRT's own client (abrt-retrace-client, ABRT <= 2.15) meets it.

Every request here is shaped as that client sends it: its release string
(``fedora-40-x86_64``, ``fedora-rawhide-x86_64``, ``fedora-40-i386``), its archive
(``tar c coredump executable package os_release rootdir os_release_in_rootdir | xz -2``,
the optional files only when the problem directory has them), its ``/checkpackage``
headers, its ``Accept-Charset``, and its password: the one ``POST /create`` gave, on
every later request (it never reads a rotated one), so the server runs with
``password_mode = "static"``.  The client itself is C and gone from Fedora; its
behaviour is written down in /work/shared/REFERENCE.md.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.messages import MirrorBuildV1, parse
from schemas.topology import MIRROR_BUILD
from services.common.bus import connect
from services.common.spool import Spool
from tests.fixtures.build import Fixtures
from tests.integration.koji_hub import KojiStandIn, build_rpms
from tests.integration.stack import Stack, free_port, start_stack

pytestmark = pytest.mark.integration

# What the client packs, in its order: the required files, then the optional ones.
ARCHIVED = ("coredump", "executable", "package", "os_release", "rootdir", "os_release_in_rootdir")
MAX_RELEASES = 32  # the client reads no more words of supported_releases
XZ = "application/x-xz-compressed-tar"


def release_id(os_release: str, arch: str) -> str:
    """The client's release string (its get_release_id) from a crash's ``os_release``
    ("Fedora release 40 (Forty)") and ``architecture`` files."""
    name, _, rest = os_release.strip().partition(" release ")
    version = rest.split(" ")[0]
    if name == "Fedora":
        name = "fedora"
        if version == "Rawhide":
            version = "rawhide"
    if arch in ("i686", "i586"):
        arch = "i386"
    return f"{name}-{version}-{arch}"


def client_archive(problem_dir: Path) -> bytes:
    """``tar cO --directory=DIR <files it has> | xz -2``, as the client runs them."""
    present = [name for name in ARCHIVED if (problem_dir / name).is_file()]
    tar = subprocess.Popen(
        ["tar", "cO", f"--directory={problem_dir}", *present], stdout=subprocess.PIPE
    )
    assert tar.stdout is not None
    packed = subprocess.run(
        ["xz", "-2", "-"], stdin=tar.stdout, capture_output=True, check=True, timeout=120
    )
    tar.stdout.close()
    assert tar.wait(timeout=60) == 0
    return packed.stdout


@dataclass
class AbrtClient:
    """The client's requests, header for header."""

    port: int

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={**headers, "Accept-Charset": "UTF-8"})
            answer = conn.getresponse()
            return answer.status, answer.headers, answer.read()
        finally:
            conn.close()

    def settings(self) -> dict[str, str | list[str]]:
        """``GET /settings`` read as the client reads it (its get_settings)."""
        status, _, body = self.request("GET", "/settings", {})
        assert status == 200, body
        settings: dict[str, str | list[str]] = {}
        for row in body.decode().split("\n"):
            key, space, value = row.partition(" ")
            if not space:
                continue
            if key in ("supported_formats", "supported_releases"):
                # At most 32 words; the last one takes whatever is left of the line.
                words = value.split(" ", MAX_RELEASES - 1)
                settings[key] = words
            else:
                settings[key] = value
        return settings

    def checkpackage(self, nvr: str, arch: str, release: str) -> tuple[int, str]:
        status, headers, body = self.request(
            "GET",
            "/checkpackage",
            {"X-Package-NVR": nvr, "X-Package-Arch": arch, "X-OS-Release": release},
        )
        assert "Location" not in headers
        return status, body.decode()


def test_the_clients_whole_flow_against_the_real_stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    tmp_path: Path,
) -> None:
    stack = start_stack(
        tmp_path_factory.mktemp("abrt"),
        make_broker_url(),
        crash_fixtures,
        overrides={
            "RETRACE_INTAKE__PASSWORD_MODE": "static",
            "RETRACE_INTAKE__RELEASES": '["fedora-39", "fedora-40", "fedora-41"]',
            "RETRACE_INTAKE__RAWHIDE": "41",
        },
    )
    try:
        _flow(stack, AbrtClient(stack.port), crash_fixtures, tmp_path)
    finally:
        stack.down()


def _flow(stack: Stack, client: AbrtClient, fixtures: Fixtures, tmp_path: Path) -> None:
    # A crash in a container: abrt-dump-journal-core wrote rootdir and the release inside.
    problem = tmp_path / "problem"
    shutil.copytree(fixtures.crash.problem_dir, problem)
    (problem / "rootdir").write_text("/var/lib/machines/f40")
    (problem / "os_release_in_rootdir").write_text("Fedora release 40 (Forty)")
    package = (problem / "package").read_text()
    arch = (problem / "architecture").read_text()
    release = release_id((problem / "os_release").read_text(), arch)
    assert release == "fedora-40-x86_64"

    settings = client.settings()
    assert int(str(settings["running_tasks"])) < int(str(settings["max_running_tasks"]))
    assert XZ in settings["supported_formats"]
    offered = settings["supported_releases"]
    assert offered == ["fedora-rawhide-x86_64", "fedora-40-x86_64", "fedora-39-x86_64"]
    assert release in offered[:MAX_RELEASES]

    assert client.checkpackage(package, arch, release) == (302, "")
    # Its build by its source name, one of its subpackages, and what is not there.
    assert client.checkpackage("manylibs-3.0-1.fc40", arch, release)[0] == 302
    assert client.checkpackage("manylibs-core-3.0-1.fc40", arch, release)[0] == 302
    assert client.checkpackage(package, arch, "fedora-rawhide-x86_64")[0] == 404
    assert client.checkpackage(package, arch, "fedora-39-x86_64")[0] == 404
    status, text = client.checkpackage(package, "i686", "fedora-40-i386")
    assert (status, "x86_64 machines, not i386" in text) == (404, True)

    status, headers, body = client.request(
        "POST", "/create", {"Content-Type": XZ, "X-Task-Type": "0"}, client_archive(problem)
    )
    assert status == 201, (body, stack.logs())
    task_id, password = headers["X-Task-Id"], headers["X-Task-Password"]
    crash_dir = Spool(stack.home / "var/spool").crash_dir(task_id)
    assert (crash_dir / "rootdir").read_text() == "/var/lib/machines/f40"
    assert (crash_dir / "os_release_in_rootdir").exists()

    auth = {"X-Task-Password": password}  # the same one, every time
    deadline = time.monotonic() + 240
    while True:
        status, headers, body = client.request("GET", f"/{task_id}", auth)
        assert status == 200, (status, body, stack.logs())
        assert headers.get("X-Task-Password", password) == password
        if headers["X-Task-Status"] != "PENDING":
            break
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.5)
    assert headers["X-Task-Status"] == "FINISHED_SUCCESS", stack.logs()
    status, _, backtrace = client.request("GET", f"/{task_id}/backtrace", auth)
    assert status == 200
    assert f"in {fixtures.crash.function} (" in backtrace.decode()
    # Asked again with the same password, as a client that lost the answer would.
    assert client.request("GET", f"/{task_id}/backtrace", auth)[0] == 200


# --- A build only Koji has -----------------------------------------------------

FRESH, SLUGGISH, UNFINISHED, OFFLINE = 401, 402, 403, 404
CHECKPACKAGE_LIMIT = 12
MIRROR_TIMEOUT = 1.5


@dataclass
class KojiStack:
    stack: Stack
    koji: KojiStandIn
    client: AbrtClient
    mirror: str  # the mirror's HTTP face
    nvrs: dict[int, str]

    def commands(self) -> list[MirrorBuildV1]:
        """The mirror commands waiting in the mirror's queue (no worker reads it here)."""
        connection = connect(self.stack.broker_url)
        try:
            channel = connection.channel()
            found: list[MirrorBuildV1] = []
            while True:
                method, _props, body = channel.basic_get(MIRROR_BUILD.queue_for(), auto_ack=False)
                if method is None or body is None:
                    return found
                found.append(parse(MirrorBuildV1, body))
        finally:
            connection.close()  # unacked: they go back to the queue

    def ask_mirror(self, nvr: str) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(f"{self.mirror}/koji/builds/{nvr}", timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())


def _wait_http(url: str, stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
        except OSError:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        else:
            return


@pytest.fixture(scope="module")
def koji_stack(
    tmp_path_factory: pytest.TempPathFactory, make_broker_url: Callable[[], str]
) -> Iterator[KojiStack]:
    """The intake and the mirror's HTTP face (no worker), the Koji stand-in behind it."""
    root = tmp_path_factory.mktemp("abrt-koji")
    koji = KojiStandIn(root / "koji").start()
    nvrs = {
        build_id: koji.add_build(build_id, build_rpms(root, name, 1), state=state).nvr
        for build_id, name, state in (
            (FRESH, "fresh", 1),
            (SLUGGISH, "sluggish", 1),
            (UNFINISHED, "unfinished", 0),
            (OFFLINE, "offline", 1),
        )
    }
    mirror_port = free_port()
    settings = (
        f'[mirror]\nkoji_hub = "{koji.hub_url}"\nkoji_topurl = "{koji.top_url}"\n'
        "koji_timeout = 10\n"
        f'[intake]\nmirror_url = "http://127.0.0.1:{mirror_port}"\n'
        f"mirror_timeout_seconds = {MIRROR_TIMEOUT}\n"
        f"checkpackage_limit = {CHECKPACKAGE_LIMIT}\ncheckpackage_window_seconds = 600\n"
    )
    stack = Stack(root / "home", make_broker_url(), extra_settings=settings)
    stack.write_settings()
    for admin in (("migrate",), ("topology",)):
        done = stack.command("retrace-admin", *admin)
        assert done.returncode == 0, done.stderr
    stack.start("retrace-mirror", "serve", "--bind", f"127.0.0.1:{mirror_port}", "--workers", "1")
    stack.start("retrace-intake", "serve", "--bind", f"127.0.0.1:{stack.port}", "--workers", "1")
    mirror = f"http://127.0.0.1:{mirror_port}"
    _wait_http(f"{mirror}/__lbheartbeat__", stack)
    _wait_http(f"{stack.base}/__lbheartbeat__", stack)
    try:
        yield KojiStack(stack, koji, AbrtClient(stack.port), mirror, nvrs)
    finally:
        stack.down()
        koji.stop()


def test_a_build_only_koji_has_is_302_and_the_mirror_is_told_to_fetch_it(
    koji_stack: KojiStack,
) -> None:
    fresh = koji_stack.nvrs[FRESH]
    assert koji_stack.ask_mirror(fresh) == (
        200,
        {"nvr": fresh, "build_id": FRESH, "os_release": "fedora-40"},
    )
    assert koji_stack.client.checkpackage(fresh, "x86_64", "fedora-40-x86_64") == (302, "")
    [command] = koji_stack.commands()
    assert command.build == fresh
    assert "intake, checkpackage" in command.requested_by
    # Asked again (the same crash elsewhere): 302 at once, no second Koji lookup or command.
    lookups = koji_stack.koji.calls.count("getBuild")
    assert koji_stack.client.checkpackage(fresh, "x86_64", "fedora-40-x86_64")[0] == 302
    assert koji_stack.koji.calls.count("getBuild") == lookups
    assert len(koji_stack.commands()) == 1


def test_a_build_koji_lacks_or_has_not_finished_is_404_and_nothing_is_asked(
    koji_stack: KojiStack,
) -> None:
    before = len(koji_stack.commands())
    status, said = koji_stack.ask_mirror("absent-1.0-1.fc40")
    assert (status, said["reason"]) == (404, "Koji has no build absent-1.0-1.fc40")
    assert (
        koji_stack.client.checkpackage("absent-1.0-1.fc40", "x86_64", "fedora-40-x86_64")[0] == 404
    )
    unfinished = koji_stack.nvrs[UNFINISHED]
    status, said = koji_stack.ask_mirror(unfinished)
    assert status == 404
    assert "BUILDING, not COMPLETE" in str(said["reason"])
    assert koji_stack.client.checkpackage(unfinished, "x86_64", "fedora-40-x86_64")[0] == 404
    assert len(koji_stack.commands()) == before


def test_koji_down_or_too_slow_is_404_in_time_not_a_hang(koji_stack: KojiStack) -> None:
    before = len(koji_stack.commands())
    offline = koji_stack.nvrs[OFFLINE]
    koji_stack.koji.down = True
    try:
        assert koji_stack.ask_mirror(offline)[0] == 503
        assert koji_stack.client.checkpackage(offline, "x86_64", "fedora-40-x86_64")[0] == 404
    finally:
        koji_stack.koji.down = False
    sluggish = koji_stack.nvrs[SLUGGISH]
    koji_stack.koji.slow = MIRROR_TIMEOUT + 3
    try:
        started = time.monotonic()
        status, _ = koji_stack.client.checkpackage(sluggish, "x86_64", "fedora-40-x86_64")
        took = time.monotonic() - started
    finally:
        koji_stack.koji.slow = 0
    assert status == 404
    assert took < MIRROR_TIMEOUT + 1.5, took
    assert len(koji_stack.commands()) == before
    koji_stack.stack.wait_log(f"the mirror did not say whether Koji has {sluggish}")


def test_checkpackage_past_the_rate_limit_is_429(koji_stack: KojiStack) -> None:
    fresh = koji_stack.nvrs[FRESH]
    answers = [
        koji_stack.client.checkpackage(fresh, "x86_64", "fedora-40-x86_64")[0]
        for _ in range(CHECKPACKAGE_LIMIT + 1)
    ]
    # Earlier tests of the module used part of this address's window.
    assert answers[-1] == 429
    assert set(answers) == {302, 429}
    status, headers, body = koji_stack.client.request(
        "GET",
        "/checkpackage",
        {"X-Package-NVR": fresh, "X-Package-Arch": "x86_64", "X-OS-Release": "fedora-40-x86_64"},
    )
    assert status == 429
    assert 0 < int(headers["Retry-After"]) <= 600
    assert b"asked about more than 12 packages in 600 s" in body
