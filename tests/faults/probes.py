"""The fault probes, each a stack of its own and a fault injected while uploads stream in.

``scale`` multiplies the uploads and the faults: 1 in CI (``tests/faults``), more in
``make faults`` (``python -m tests.faults``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.analyzer.worker import FAULT
from tests.faults.harness import Campaign, Verdict
from tests.fixtures.build import Fixtures
from tests.integration.broker import close_connections
from tests.integration.koji_hub import KojiStandIn
from tests.integration.stack import BIN, Stack


@dataclass(frozen=True)
class Probe:
    """One row of the table: how to break the stack while ``uploads`` arrive."""

    name: str
    run: Callable[[Stack, Campaign, int], float]
    """Injects the fault during the campaign; returns when the fault ended (``time.time()``)."""
    uploads: int
    patience: float = 180.0
    small_spool: bool = False
    """Mount the spool on a small tmpfs (as root) before the stack starts."""
    koji: bool = False
    """Serve the crashed build from a Koji stand-in that sends bad downloads first."""


def stack_for(
    home: Path,
    broker_url: str,
    fixtures: Fixtures,
    small_spool: bool = False,
    koji: KojiStandIn | None = None,
) -> Stack:
    """The stack with the fixture RPMs mirrored and two analyzers; with ``koji``, the
    crashed build is left to the mirror worker to fetch from that Koji on demand."""
    # The probes upload several at a time from one address: that is not the fault.
    overrides = {"RETRACE_INTAKE__MAX_UPLOADS_PER_CLIENT": "32"}
    extra, leave_out = "", set()
    if koji is not None:
        crashed = [r for r in fixtures.rpms if r.sourcerpm.startswith(f"{CRASHED}-")]
        koji.add_build(CRASHED_BUILD, [r.path for r in crashed])
        leave_out = {r.name for r in crashed}
        extra = (
            f'[mirror]\nkoji_hub = "{koji.hub_url}"\nkoji_topurl = "{koji.top_url}"\n'
            "retry_delays = [1, 2]\nkoji_timeout = 10\n"
        )
        overrides |= {
            "RETRACE_ANALYZER__FETCH_WAIT_SECONDS": "20",
            "RETRACE_ANALYZER__FETCH_ATTEMPTS": "5",
        }
    if small_spool:
        spool = home / "var" / "spool"
        spool.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(spool)], check=True)
        # The floor keeps room for results: with none, accepted cores can fill the disk
        # so that no task can store its results, and none ever frees its core (a probe
        # with 0 showed it).  Uploads already past the check still run into ENOSPC.
        overrides |= {
            "RETRACE_INTAKE__MIN_FREE_SPACE_MIB": "2",
            "RETRACE_ANALYZER__RESULTS_RETRY_SECONDS": "2",
        }
    stack = Stack(home, broker_url, overrides=overrides, extra_settings=extra)
    stack.up()
    rpms = [str(r.path) for r in fixtures.rpms if r.name not in leave_out]
    imported = stack.command("retrace-mirror", "import", *rpms)
    assert imported.returncode == 0, imported.stderr
    if koji is not None:
        stack.start("retrace-mirror", "worker", log_name="mirror-worker")
    # As deployed: the delivery limit and dead-lettering of the command queues.
    policies = stack.command("retrace-admin", "policies")
    assert policies.returncode == 0, policies.stderr
    stack.start("retrace-analyzer", "run", log_name="retrace-analyzer-2")
    return stack


def broker_drops(stack: Stack, campaign: Campaign, scale: int) -> float:
    """Every connection of the vhost closed every 3 s while uploads stream in."""
    with campaign.streaming(20 * scale, parallel=4, pause=0.2):
        for _ in range(4 * scale):
            time.sleep(3)
            close_connections(stack.broker_url, at_least=1, timeout=5)
        return time.time()  # the fault's end; leaving the block waits for the uploads


def analyzer_killed(stack: Stack, campaign: Campaign, scale: int) -> float:
    """An analyzer killed with SIGKILL mid-retrace, again and again, restarted at once."""
    analyzers = [p for p in stack.processes if "retrace-analyzer" in str(p.args)]
    victim = analyzers[0]
    with campaign.streaming(16 * scale, parallel=3, pause=0.1):
        for round_ in range(4 * scale):
            time.sleep(2.5)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            stack.processes.remove(victim)
            victim = stack.start("retrace-analyzer", "run", log_name=f"analyzer-{round_}")
        return time.time()


def results_crash(stack: Stack, campaign: Campaign, scale: int) -> float:
    """An analyzer that dies between writing a task's results and the update that
    finishes it (fault injection), restarted with the same fault each time it died."""
    faulty_env = {**stack.env, FAULT: "exit-before-finish"}
    with campaign.streaming(12 * scale, parallel=2, pause=0.3):
        deaths = 0
        faulty = _start_with(stack, faulty_env, "analyzer-faulty-0")
        deadline = time.monotonic() + 30 * scale
        while deaths < 3 * scale and time.monotonic() < deadline:
            if faulty.poll() is not None:
                deaths += 1
                stack.processes.remove(faulty)
                faulty = _start_with(stack, faulty_env, f"analyzer-faulty-{deaths}")
            time.sleep(0.2)
        faulty.terminate()
        faulty.wait(timeout=60)
        stack.processes.remove(faulty)
        return time.time()


def _start_with(stack: Stack, env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
    log = (stack.home / f"{log_name}.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "retrace-analyzer"), "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    stack.processes.append(proc)
    return proc


def intake_worker_killed(stack: Stack, campaign: Campaign, scale: int) -> float:
    """The intake's gunicorn worker SIGKILLed while uploads arrive; gunicorn starts another."""
    master = next(p for p in stack.processes if "retrace-intake" in str(p.args))
    with campaign.streaming(16 * scale, parallel=3, pause=0.1):
        for _ in range(3 * scale):
            time.sleep(2)
            for pid in _children(master.pid):
                os.kill(pid, signal.SIGKILL)
        return time.time()


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


def slow_clients(stack: Stack, campaign: Campaign, scale: int) -> float:
    """Idle sockets and uploads trickling a byte a second, from many addresses, held
    open while the real uploads stream in."""
    held: list[socket.socket] = []
    try:
        for n in range(40 * scale):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + n % 250}", 0))
            sock.connect(("127.0.0.1", stack.port))
            if n % 2:
                sock.sendall(
                    b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                    b"Content-Type: application/x-xz-compressed-tar\r\n\r\n"
                )
            held.append(sock)
        with campaign.streaming(12 * scale, parallel=2, pause=0.2):
            for _ in range(10 * scale):
                for sock in held[1::2]:
                    with contextlib.suppress(OSError):
                        sock.send(b"\0")
                time.sleep(1)
            return time.time()
    finally:
        for sock in held:
            sock.close()


def spool_full(stack: Stack, campaign: Campaign, scale: int) -> float:
    """Uploads onto a spool on a 5 MiB tmpfs that fills up: 507s, never 500s, and what
    was accepted is retraced once the cores of finished tasks make room again."""
    with campaign.streaming(12 * scale, parallel=4, pause=0.5):
        time.sleep(8 * scale)
        return time.time()


CRASHED, CRASHED_BUILD = "crasher", 301


def bad_downloads(stack: Stack, campaign: Campaign, scale: int) -> float:
    """The crashed build is not mirrored yet, and Koji answers its first downloads of the
    package with an HTML error page, then cuts one short: the mirror worker retries
    them as bad downloads, and every task waits for the build and is retraced."""
    store = campaign.store
    with campaign.streaming(6 * scale, parallel=2, pause=0.5):
        deadline = time.monotonic() + 180
        while not store.mirror.find_packages(CRASHED, "fedora-40") and time.monotonic() < deadline:
            time.sleep(0.5)
        return time.time()


PROBES = (
    Probe("broker connections closed every 3 s", broker_drops, uploads=20),
    Probe("analyzer SIGKILLed mid-retrace", analyzer_killed, uploads=16),
    Probe("analyzer dies between results and state", results_crash, uploads=12),
    Probe("intake worker SIGKILLed mid-upload", intake_worker_killed, uploads=16),
    Probe("slow and idle clients", slow_clients, uploads=12),
    Probe("spool full (5 MiB tmpfs)", spool_full, uploads=12, small_spool=True),
    Probe("bad downloads of the crashed build", bad_downloads, uploads=6, koji=True),
)


def run_probe(
    probe: Probe, home: Path, broker_url: str, fixtures: Fixtures, scale: int = 1
) -> Verdict:
    """Start a stack, run the probe on it, judge, stop the stack."""
    koji = KojiStandIn(home.parent / "koji").start() if probe.koji else None
    stack = stack_for(home, broker_url, fixtures, probe.small_spool, koji)
    if koji is not None:
        name = fixtures.rpm(CRASHED).filename
        koji.html[name], koji.truncate[name] = 2, 1
    try:
        campaign = Campaign(stack, fixtures.crash.problem_dir, home)
        ended = probe.run(stack, campaign, scale)
        campaign.stream(2, parallel=1)  # after the fault: how soon is a task done again?
        verdict = campaign.judge(probe.name, ended, probe.patience)
        if koji is not None:
            name = fixtures.rpm(CRASHED).filename
            assert (koji.html[name], koji.truncate[name]) == (0, 0), "no bad download was sent"
        still_serving = all(p.poll() is None for p in stack.processes)
        if not still_serving:
            verdict.stuck.append("a service exited")
        return verdict
    finally:
        stack.down()
        if koji is not None:
            koji.stop()
        if probe.small_spool:
            subprocess.run(["umount", "-l", str(home / "var" / "spool")], check=False)


def logs_of(home: Path) -> str:
    """The services' logs of a probe, for a failure message."""
    return subprocess.run(
        ["tail", "-n", "40", *map(str, sorted(home.glob("home/*.log")))],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
