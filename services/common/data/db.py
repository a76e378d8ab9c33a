"""The plumbing every data module shares: the engine and its transactions.

No table is defined here: each owner's module (:mod:`.intake`, :mod:`.mirror`,
:mod:`.analyzer`) holds its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Connection, Engine


def _enable_sqlite_concurrency(dbapi_conn: Any, _record: Any) -> None:
    # Several processes share one SQLite file: WAL lets readers work during a write,
    # and foreign keys must be switched on per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_engine(url: str) -> Engine:
    """An engine for ``url``, set up for several processes sharing the database."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class Database:
    """The shared database handle that every data object is built from."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Database:
        """The database at ``url``."""
        return cls(create_engine(url))

    @contextmanager
    def begin(self, conn: Connection | None = None) -> Iterator[Connection]:
        """A transaction: ``conn``'s own if one is given (the caller's transaction spans
        several owners' functions), else a new one committed at the end."""
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as new:
            yield new

    @contextmanager
    def connect(self, conn: Connection | None = None) -> Iterator[Connection]:
        """A connection to read with: ``conn`` if one is given, else a new one."""
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as new:
            yield new

    def ping(self) -> None:
        """Raise :class:`sqlalchemy.exc.SQLAlchemyError` unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dialect_insert(self) -> Callable[..., Any]:
        """The dialect's ``insert`` (both spell an upsert the same way, from their own module)."""
        if self.engine.dialect.name == "postgresql":
            return sa.dialects.postgresql.insert
        return sa.dialects.sqlite.insert

    def dispose(self) -> None:
        """Close the pooled connections (before a fork, or at the end)."""
        self.engine.dispose()


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time: SQLite hands back naive ones, PostgreSQL aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
