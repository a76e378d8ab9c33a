"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, start_stack


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    """Intake and analyzer running on a vhost of their own, the fixture RPMs mirrored.

    One stack per test module: its tests share it, other modules never see it.
    """
    home = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    stack = start_stack(home, make_broker_url(), crash_fixtures)
    yield stack
    stack.down()
