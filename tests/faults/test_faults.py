"""Each fault probe once, at a small scale: nothing lost, duplicated, stuck, no 500."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.probes import PROBES, Probe, run_probe
from tests.fixtures.build import Fixtures

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_a_fault_loses_duplicates_and_strands_nothing(
    probe: Probe,
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> None:
    home = tmp_path_factory.mktemp("fault")
    verdict = run_probe(probe, home / "home", make_broker_url(), crash_fixtures)
    assert verdict.tasks > 0, verdict
    assert verdict.clean, (verdict, sorted((home / "home").glob("*.log")))
    assert verdict.recovery is not None, verdict
