"""Shared test fixtures: private RabbitMQ vhosts, store databases and the real crash fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.build import Fixtures, build_fixtures
from tests.integration.broker import Vhosts

POSTGRESQL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STORE_KINDS = ("sqlite", "postgresql")


VHOSTS = Vhosts()


@pytest.fixture(scope="session")
def make_broker_url() -> Iterator[Callable[[], str]]:
    """Makes fresh vhosts on the local RabbitMQ; each is deleted when its module ends.

    Tests never share queues with each other or with a running demo.
    """
    yield VHOSTS.make
    VHOSTS.delete(kept=True)


@pytest.fixture(scope="module", autouse=True)
def module_vhosts_deleted() -> Iterator[None]:
    """Deletes the vhosts a module made, after its last fixture is gone (autouse fixtures
    are set up first, so they are torn down last)."""
    yield
    VHOSTS.delete()


@pytest.fixture(scope="session")
def broker_url(make_broker_url: Callable[[], str]) -> str:
    """One private vhost for the session's broker tests."""
    return VHOSTS.make(keep=True)


@pytest.fixture(scope="session")
def crash_fixtures() -> Fixtures:
    """The real RPMs and kernel-written core of tests/fixtures, built once and cached."""
    return build_fixtures()


@pytest.fixture(scope="session")
def make_postgresql_url() -> Iterator[Callable[[], str]]:
    """Makes fresh schemas in the local PostgreSQL's ``test`` database, all dropped after
    the session, so that runs (and tests) never see each other's rows."""
    admin = sa.create_engine(POSTGRESQL, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRESQL} does not answer: {exc}")
    made: list[str] = []

    def make() -> str:
        schema = f"retrace_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        made.append(schema)
        return f"{POSTGRESQL}?options=-csearch_path%3D{schema}"

    yield make
    with admin.connect() as conn:
        for schema in made:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database for one test: an SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/retrace.sqlite3"
    make: Callable[[], str] = request.getfixturevalue("make_postgresql_url")
    return make()
