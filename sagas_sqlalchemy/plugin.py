"""The SQL store as a sagas plugin: entry point ``sqlalchemy`` in ``sagas.stores``.

The core never imports this package; it finds :data:`store` through the entry point that
``sagas`` declares (see :mod:`sagas_core.plugins`). It serves PostgreSQL (psycopg 3, asyncpg)
and SQLite (aiosqlite) URLs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagas_sqlalchemy.migrate import drift, upgrade
from sagas_sqlalchemy.store import create_store

if TYPE_CHECKING:
    from sagas_abstractions import SagaRepository

__all__ = ["SqlStorePlugin", "store"]


class SqlStorePlugin:
    """Opens a :class:`~sagas_sqlalchemy.SqlSagaStore` from a URL; migrates its tables."""

    name = "sqlalchemy"
    schemes = frozenset({"postgresql", "postgres", "sqlite"})

    async def open_store(
        self, url: str, *, migrate: bool | None = None, **options: Any
    ) -> SagaRepository:
        """A :class:`~sagas_sqlalchemy.SqlSagaStore` at ``url``, asked once.

        Args:
            url: The database URL.
            migrate: Migrate now; ``None`` migrates SQLite only.
            **options: Passed to :func:`~sagas_sqlalchemy.create_store` (``table_prefix``,
                engine options).
        """
        created = create_store(url, migrate=migrate, **options)
        try:
            await created.initialize()  # ready now: a bad URL or path fails here, not mid-saga
        except BaseException:
            await created.close()
            raise
        return created

    def upgrade(self, url: str, revision: str, *, table_prefix: str) -> None:
        """Migrate the sagas tables at ``url`` to ``revision`` (``sagas migrate``)."""
        upgrade(url, revision, table_prefix=table_prefix)

    def drift(self, url: str, *, table_prefix: str) -> list[str]:
        """How the tables at ``url`` differ from this version's schema (``migrate --check``)."""
        return drift(url, table_prefix=table_prefix)

    def __repr__(self) -> str:
        return "<sagas store sqlalchemy>"


store = SqlStorePlugin()
"""The plugin object the ``sagas.stores`` entry point names."""
