"""The fault probes, each a stack of its own and a fault injected while uploads stream in.

``scale`` multiplies the uploads and the faults: 1 in CI (``tests/faults``), more in
``make faults`` (``python -m tests.faults``).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.faults.harness import Campaign, Verdict
from tests.fixtures.build import Fixtures
from tests.integration.broker import close_connections
from tests.integration.stack import Stack, start_stack


@dataclass(frozen=True)
class Probe:
    """One row of the table: how to break the stack while ``uploads`` arrive."""

    name: str
    run: Callable[[Stack, Campaign, int], float]
    """Injects the fault during the campaign; returns when the fault ended (``time.time()``)."""
    uploads: int
    patience: float = 180.0


def stack_for(home: Path, broker_url: str, fixtures: Fixtures) -> Stack:
    """The stack with the fixture RPMs mirrored and two analyzers."""
    # The probes upload several at a time from one address: that is not the fault.
    overrides = {"RETRACE_INTAKE__MAX_UPLOADS_PER_CLIENT": "32"}
    stack = start_stack(home, broker_url, fixtures, overrides=overrides)
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


PROBES = (
    Probe("broker connections closed every 3 s", broker_drops, uploads=20),
    Probe("analyzer SIGKILLed mid-retrace", analyzer_killed, uploads=16),
)


def run_probe(
    probe: Probe, home: Path, broker_url: str, fixtures: Fixtures, scale: int = 1
) -> Verdict:
    """Start a stack, run the probe on it, judge, stop the stack."""
    stack = stack_for(home, broker_url, fixtures)
    try:
        campaign = Campaign(stack, fixtures.crash.problem_dir, home)
        ended = probe.run(stack, campaign, scale)
        campaign.stream(2, parallel=1)  # after the fault: how soon is a task done again?
        verdict = campaign.judge(probe.name, ended, probe.patience)
        still_serving = all(p.poll() is None for p in stack.processes)
        if not still_serving:
            verdict.stuck.append("a service exited")
        return verdict
    finally:
        stack.down()


def logs_of(home: Path) -> str:
    """The services' logs of a probe, for a failure message."""
    return subprocess.run(
        ["tail", "-n", "40", *map(str, sorted(home.glob("home/*.log")))],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
