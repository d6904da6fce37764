"""The registry database: the only module that opens connections. SQLite by default, PostgreSQL by URL.

Migrations: numbered modules in `migrations/` (m0001_initial ...), each an `upgrade(op)` written
with alembic's `Operations`, recorded in `schema_migration`. Alembic's operations give portable DDL
for both databases (SQLite's batch mode included) without an alembic.ini or a script directory to
ship; its environment machinery would buy nothing for a schema owned by one service. A test checks
that the migrated schema equals models.py (alembic's compare_metadata), so a model change without a
migration fails CI.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Engine, insert, select, text
from sqlmodel import Session

from services.registry import migrations
from services.registry.models import SchemaMigration, utcnow
from services.runtime.auth import create_database_engine

# Any constant: PostgreSQL's advisory lock keeps two starting registries from migrating at once.
_MIGRATION_LOCK = 0x466C7977


def _migrations() -> list[tuple[int, str, object]]:
    found = []
    for info in pkgutil.iter_modules(migrations.__path__):
        if info.name.startswith("m") and info.name[1:5].isdigit():
            module = importlib.import_module(f"{migrations.__name__}.{info.name}")
            found.append((int(info.name[1:5]), info.name, module.upgrade))
    return sorted(found, key=lambda item: item[0])


class RegistryStore:
    """Connections to the registry database, transactions, and schema migrations."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_database_engine(url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> list[str]:
        """Apply pending migrations in one transaction; returns the names applied."""
        applied_now: list[str] = []
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            SchemaMigration.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
            done = set(conn.scalars(select(SchemaMigration.version)))  # type: ignore[call-overload]
            for version, name, upgrade in _migrations():
                if version in done:
                    continue
                upgrade(Operations(MigrationContext.configure(conn)))  # type: ignore[operator]
                conn.execute(insert(SchemaMigration).values(version=version, name=name, applied_at=utcnow()))
                applied_now.append(name)
        return applied_now

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back on any error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()
