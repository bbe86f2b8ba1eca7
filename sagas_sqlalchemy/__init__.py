"""sagas on SQL databases: the SQLAlchemy store, its tables, outbox/inbox and migrations.

PostgreSQL (psycopg 3 by default, asyncpg accepted) and SQLite (aiosqlite, the embedded
default)::

    from sagas_sqlalchemy import create_store

    store = create_store("sqlite+aiosqlite:///sagas.db")        # created and migrated on first use
    store = create_store("postgresql+psycopg://app@db/app")     # run `sagas migrate` first
    ...
    await store.close()
"""

INSTALL_SAGAS_SQLALCHEMY = """
To use the SQL store, install the SQLAlchemy extra:

    pip install 'sagas-orchestrator[sqlalchemy]'

(or 'sagas-orchestrator[postgres]' for PostgreSQL with psycopg 3)
"""

try:
    import aiosqlite as _aiosqlite  # noqa: F401
    import alembic as _alembic  # noqa: F401
    import sqlalchemy as _sqlalchemy  # noqa: F401
except ImportError as _missing:  # pragma: no cover - depends on the installed extras
    raise ImportError(INSTALL_SAGAS_SQLALCHEMY) from _missing

from sagas_sqlalchemy.engine import create_engine  # noqa: E402
from sagas_sqlalchemy.idempotency import SqlIdempotencyStore, build_outcomes_table  # noqa: E402
from sagas_sqlalchemy.store import SqlSagaStore, create_store  # noqa: E402
from sagas_sqlalchemy.tables import DEFAULT_TABLE_PREFIX, SagaTables, build_tables  # noqa: E402

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "INSTALL_SAGAS_SQLALCHEMY",
    "SagaTables",
    "SqlIdempotencyStore",
    "SqlSagaStore",
    "build_outcomes_table",
    "build_tables",
    "create_engine",
    "create_store",
]
