"""Alembic environment of the sagas tables.

Run it through ``sagas_sqlalchemy.migrate`` (``upgrade(url)``), which passes a connection and
the table prefix. Plain ``alembic`` works too with an ini file that sets ``script_location`` to
this directory, ``sqlalchemy.url`` (a synchronous driver) and optionally ``sagas_table_prefix``.

Only sagas tables are ever compared or touched, and the version table is
``<prefix>alembic_version``, so a host application's own Alembic history is never disturbed.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import engine_from_config, pool

from sagas_sqlalchemy.tables import DEFAULT_TABLE_PREFIX, build_tables

config = context.config
prefix: str = (
    config.attributes.get("table_prefix")
    or config.get_main_option("sagas_table_prefix")
    or DEFAULT_TABLE_PREFIX
)
tables = build_tables(prefix)
target_metadata = tables.metadata


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:  # noqa: ARG001
    """Reflect only sagas tables of this prefix (never a host application's)."""
    if type_ == "table":
        return name in tables.names
    return True


def include_object(
    obj: Any,  # noqa: ARG001
    name: str | None,
    type_: str,
    reflected: bool,  # noqa: ARG001, FBT001
    compare_to: Any,  # noqa: ARG001
) -> bool:
    """Compare only sagas tables of this prefix, and never the version table."""
    if type_ == "table":
        return name in tables.metadata.tables
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=tables.version_table,
        include_name=include_name,
        include_object=include_object,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade --sql``)."""
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run on the caller's connection, or on one made from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as own:
        _configure(connection=own, render_as_batch=own.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
