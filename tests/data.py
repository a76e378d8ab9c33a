"""Every owner's data object on one test database, for tests that set up or inspect
rows across services (a service itself wires only the ones it uses)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from services.common.data import schema
from services.common.data.analyzer import AnalyzerData
from services.common.data.db import Database
from services.common.data.intake import IntakeData
from services.common.data.mirror import MirrorData


@dataclass(frozen=True)
class Data:
    """The intake's, the mirror's and the analyzer's data objects on one database."""

    db: Database
    intake: IntakeData
    mirror: MirrorData
    analyzer: AnalyzerData

    @classmethod
    def of(cls, db: Database) -> Data:
        """The data objects on ``db``."""
        intake = IntakeData(db)
        return cls(db, intake, MirrorData(db), AnalyzerData(db, intake))

    @classmethod
    def from_url(cls, url: str) -> Data:
        """The data objects on the database at ``url``."""
        return cls.of(Database.from_url(url))

    @property
    def engine(self) -> Engine:
        """The database's engine, for tests that look at rows directly."""
        return self.db.engine

    def migrate(self) -> None:
        """Create or upgrade every service's tables."""
        schema.migrate(self.db)
