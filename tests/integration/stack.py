"""The services as separate processes, started through their real console scripts."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.data.mirror import KojiBuild
from tests.data import Data
from tests.fixtures.build import Fixtures

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A home folder with settings, and the intake and analyzer running on it."""

    home: Path
    broker_url: str
    overrides: dict[str, str] = field(default_factory=dict)
    """Settings as RETRACE_<SECTION>__<KEY> environment overrides."""
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_settings: str = ""  # more TOML sections, e.g. a [mirror] pointing at a Koji stand-in
    # Single-use task passwords: each used password -> the one the intake gave for it.
    # request() follows the chain, so a test may keep using the first password it got.
    rotated: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.overrides, "RETRACE_CONFIG": str(self.home / "retrace.toml")}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_settings(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "retrace.toml").write_text(
            f'[broker]\nurl = "{self.broker_url}"\nheartbeat = 10\n[analyzer]\ngdb_timeout = 300\n'
            + self.extra_settings
        )

    def command(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of our console scripts to completion."""
        return subprocess.run(
            [str(BIN / name), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start(self, name: str, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        log = (self.home / f"{log_name or name}.log").open("wb")
        proc = subprocess.Popen(
            [str(BIN / name), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes.append(proc)
        return proc

    def up(self) -> None:
        self.write_settings()
        for admin in (("migrate",), ("topology",)):
            done = self.command("retrace-admin", *admin)
            assert done.returncode == 0, done.stderr
        self.start("retrace-intake", "serve", "--bind", f"127.0.0.1:{self.port}", "--workers", "1")
        self.start("retrace-analyzer", "run")
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/settings", timeout=2).close()
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(self.logs()) from None
                time.sleep(0.2)
            else:
                return

    def down(self) -> None:
        for proc in self.processes:
            proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Wait until ``text`` appears in the services' logs."""
        deadline = time.monotonic() + timeout
        while text not in self.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert text in self.logs()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.home.glob("*.log"))
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request; the answer's headers are looked up case-insensitively."""
        headers = dict(headers or {})
        sent = headers.get("X-Task-Password")
        while sent in self.rotated:
            sent = self.rotated[sent]
        if sent is not None:
            headers["X-Task-Password"] = sent
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            following = answer.headers.get("X-Task-Password")
            if sent and following and following != sent:
                self.rotated[sent] = following
            return answer.status, answer.headers, answer.read()
        finally:
            conn.close()

    def wait_finished(self, task_id: str, password: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, headers, _ = self.request(
                "GET", f"/{task_id}", headers={"X-Task-Password": password}
            )
            assert status == 200, (status, self.logs())
            if headers["X-Task-Status"] != "PENDING":
                return headers["X-Task-Status"]
            time.sleep(0.5)
        raise AssertionError(f"task {task_id} did not finish\n{self.logs()}")


def pack_problem_dir(problem_dir: Path, dest: Path) -> Path:
    """A tar.xz of a problem directory, as ABRT's client packs it."""
    with tarfile.open(dest, "w:xz", preset=2) as tar:
        for path in sorted(problem_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return dest


def start_stack(
    home: Path,
    broker_url: str,
    fixtures: Fixtures,
    leave_out: tuple[str, ...] = (),
    overrides: dict[str, str] | None = None,
) -> Stack:
    """A running stack whose mirror holds the fixture RPMs (but those in ``leave_out``)."""
    stack = Stack(home, broker_url, overrides=overrides or {})
    stack.up()
    rpms = [str(r.path) for r in fixtures.rpms if r.name not in leave_out]
    imported = stack.command("retrace-mirror", "import", *rpms)
    assert imported.returncode == 0, imported.stderr
    return stack


def wait_gone(path: Path, timeout: float = 10) -> None:
    """Wait until ``path`` no longer exists (the analyzer deletes a core just after
    it announces the task final)."""
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} is still there after {timeout} s")
        time.sleep(0.05)


def wait_build(
    stack: Stack, store: Data, build_id: int, state: str, timeout: float = 60
) -> KojiBuild:
    """Wait until the mirror records Koji build ``build_id`` in ``state``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        known = store.mirror.get_build(build_id)
        if known is not None and known.state == state:
            return known
        time.sleep(0.2)
    raise AssertionError(f"build {build_id} never became {state}\n{stack.logs()}")
