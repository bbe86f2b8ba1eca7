"""Programmatic Alembic migrations for the sagas tables.

The migrations keep their own version table (``<prefix>alembic_version``, so
``sagas_alembic_version`` by default) and only ever look at sagas tables, so they coexist with a
host application's own Alembic history. Concurrent upgrades (several workers starting at once)
are serialized: by a transaction-scoped advisory lock on PostgreSQL, by the database write lock
(``BEGIN IMMEDIATE``) on SQLite. Each run is one transaction on both.

The migration scripts live in the repository's top-level ``migrations/`` directory; wheels carry
a copy at ``sagas_sqlalchemy/migrations``, which is looked at first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.pool import NullPool

from sagas_sqlalchemy.engine import BEGIN_MODE, install_sqlite_hooks, sync_url
from sagas_sqlalchemy.tables import DEFAULT_TABLE_PREFIX

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "alembic_config",
    "downgrade",
    "drift",
    "migrations_dir",
    "run_on_connection",
    "upgrade",
    "upgrade_engine",
]

Action = Literal["upgrade", "downgrade"]


def migrations_dir(package: Path | None = None) -> Path:
    """The directory holding ``env.py`` and ``versions/``.

    Args:
        package: The ``sagas_sqlalchemy`` package directory (this module's, by default).

    Raises:
        FileNotFoundError: Neither the packaged copy nor the checkout's directory exists.
    """
    package = package or Path(__file__).resolve().parent
    candidates = (package / "migrations", package.parent / "migrations")
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    searched = ", ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"sagas migrations not found (looked in {searched}); reinstall sagas")


def alembic_config(
    *, table_prefix: str = DEFAULT_TABLE_PREFIX, connection: Connection | None = None
) -> Config:
    """An Alembic config for the sagas migrations (for ``alembic.command`` calls).

    Args:
        table_prefix: Prefix of the sagas tables to migrate.
        connection: The connection to run on (inside the caller's transaction).
    """
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sagas_table_prefix", table_prefix)
    config.attributes["table_prefix"] = table_prefix
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _lock_key(table_prefix: str) -> int:
    digest = hashlib.sha256(f"sagas-migrate:{table_prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def run_on_connection(
    connection: Connection,
    action: Action = "upgrade",
    revision: str = "head",
    table_prefix: str = DEFAULT_TABLE_PREFIX,
) -> None:
    """Run a migration on ``connection``, inside its open transaction.

    On PostgreSQL it first takes a transaction-scoped advisory lock, so concurrent runs wait
    for each other and the second finds the work done.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(table_prefix)}
        )
    config = alembic_config(table_prefix=table_prefix, connection=connection)
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


def _run(url: str | URL, action: Action, revision: str, table_prefix: str) -> None:
    engine = sa.create_engine(sync_url(url), poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        install_sqlite_hooks(engine)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                connection.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
            with connection.begin():
                run_on_connection(connection, action, revision, table_prefix)
    finally:
        engine.dispose()


def upgrade(
    url: str | URL, revision: str = "head", *, table_prefix: str = DEFAULT_TABLE_PREFIX
) -> None:
    """Migrate the sagas tables at ``url`` up to ``revision`` (blocking; for CLIs and deploys).

    An async URL is fine: it is run through the matching synchronous driver (psycopg 3 serves
    both; ``asyncpg`` URLs migrate through psycopg, ``aiosqlite`` through ``sqlite3``).

    Args:
        url: Database URL.
        revision: Target revision (``head`` by default).
        table_prefix: Prefix of the sagas tables.
    """
    _run(url, "upgrade", revision, table_prefix)


def downgrade(url: str | URL, revision: str, *, table_prefix: str = DEFAULT_TABLE_PREFIX) -> None:
    """Migrate the sagas tables at ``url`` down to ``revision`` (``base`` drops them all).

    Args:
        url: Database URL.
        revision: Target revision.
        table_prefix: Prefix of the sagas tables.
    """
    _run(url, "downgrade", revision, table_prefix)


async def upgrade_engine(
    engine: AsyncEngine, revision: str = "head", *, table_prefix: str = DEFAULT_TABLE_PREFIX
) -> None:
    """Migrate through an async engine (what a store does on first use), in one transaction.

    Args:
        engine: The store's engine.
        revision: Target revision.
        table_prefix: Prefix of the sagas tables.
    """
    async with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            await connection.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
        async with connection.begin():
            await connection.run_sync(run_on_connection, "upgrade", revision, table_prefix)


def drift(url: str | URL, *, table_prefix: str = DEFAULT_TABLE_PREFIX) -> list[str]:
    """How the sagas tables at ``url`` differ from this version's schema (``tables.py``).

    Alembic's autogenerate comparison, column types included, limited to the sagas tables (other
    tables in the database are not looked at). Empty when they match: the migrations brought the
    database exactly to what the code expects. ``sagas migrate --check`` prints it.

    Args:
        url: Database URL (an async URL is read through its synchronous driver).
        table_prefix: Prefix of the sagas tables.
    """
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415 - only for this check
    from alembic.migration import MigrationContext  # noqa: PLC0415

    from sagas_sqlalchemy.tables import build_tables  # noqa: PLC0415

    metadata = build_tables(table_prefix).metadata
    engine = sa.create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "include_name": lambda name, type_, _parents: (
                        type_ != "table" or name in metadata.tables
                    ),
                },
            )
            return [_describe(change) for change in compare_metadata(context, metadata)]
    finally:
        engine.dispose()


def _describe(change: object) -> str:
    """One difference as a line: alembic's operation name and what it is about."""
    if isinstance(change, list):  # column modifications come as a list of tuples
        return "; ".join(_describe(part) for part in change)
    if isinstance(change, tuple) and change:
        action, *rest = change
        subjects = [getattr(item, "name", None) or str(item) for item in rest if item is not None]
        return f"{action}: {', '.join(subjects)}"
    return str(change)
