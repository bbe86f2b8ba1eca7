"""The embedded default store: a SQLite file, so sagas survive a restart with nothing to set up.

``await open_store()`` gives a store over ``./.sagas/sagas.sqlite3`` (or ``SAGAS_SQLITE_PATH``),
created and migrated on first use; ``await open_store(url)`` one over any database the SQL store
supports (a server database is migrated only with ``migrate=True``: run ``sagas migrate`` in
deploys). The store is found by the URL's scheme among the store plugins
(:mod:`sagas_core.plugins`: the ``sagas.stores`` entry points, ``sagas_sqlalchemy`` for SQL), when
a store is opened: the core never imports SQLAlchemy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagas_core import plugins
from sagas_core.memory.store import InMemorySagaStore

if TYPE_CHECKING:
    from sagas_abstractions import SagaRepository

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "INSTALL_SQL_STORE",
    "SQLITE_PATH_ENV",
    "close_store",
    "default_sqlite_path",
    "open_store",
]

_log = logging.getLogger("sagas.embedded")

DEFAULT_SQLITE_PATH = Path(".sagas") / "sagas.sqlite3"
"""Where the embedded store keeps its file, relative to the working directory."""

SQLITE_PATH_ENV = "SAGAS_SQLITE_PATH"
"""The environment variable that moves the embedded SQLite file."""

INSTALL_SQL_STORE = """
Durable saga state needs the SQL store; install the SQLAlchemy extra:

    pip install 'sagas-orchestrator[sqlalchemy]'

(or keep state in memory, lost on exit: open_store(allow_memory=True))
"""


def default_sqlite_path() -> Path:
    """The embedded SQLite file: ``$SAGAS_SQLITE_PATH``, else ``./.sagas/sagas.sqlite3``."""
    configured = os.environ.get(SQLITE_PATH_ENV)
    return Path(configured) if configured else DEFAULT_SQLITE_PATH


async def open_store(
    url: str | None = None,
    *,
    sqlite_path: str | Path | None = None,
    migrate: bool | None = None,
    allow_memory: bool = False,
    **options: Any,
) -> SagaRepository:
    """Open the state store: the database at ``url``, else the embedded SQLite file.

    The store's tables are ready when this returns: SQLite (the file and its directory
    included) is created and migrated on first use; a server database is migrated only when
    ``migrate=True``. Close the store with :func:`close_store`.

    Args:
        url: A database URL (``postgresql+psycopg://...``, ``sqlite+aiosqlite:///...``).
        sqlite_path: The SQLite file when there is no ``url``; default
            :func:`default_sqlite_path`.
        migrate: Migrate to the latest schema now; ``None`` migrates SQLite only.
        allow_memory: When the SQL store is not installed, log a warning and return an
            in-memory store (nothing survives the process) instead of raising.
        **options: Passed to the store plugin; for SQL, to ``sagas_sqlalchemy.create_store``
            (``table_prefix``, engine options).

    Raises:
        ImportError: The SQL store is not installed (the message says what to install), or
            no installed store serves the URL's scheme (``PluginNotFound``).
        StoreError: The database cannot be opened or migrated.

    Example:
        ```python
        store = await open_store()  # ./.sagas/sagas.sqlite3
        try:
            async with SagaRuntime(sagas=[order_saga], store=store) as runtime:
                ...
        finally:
            await close_store(store)
        ```
    """
    path: Path | None = None
    if url is None:
        path = Path(sqlite_path) if sqlite_path is not None else default_sqlite_path()
        url = f"sqlite+aiosqlite:///{path}"
    try:
        plugin = plugins.store_for(url)
    except plugins.PluginNotFound as missing:
        if not missing.not_installed:
            raise  # stores are installed, but none serves this URL: say so, not "install"
        if not allow_memory:
            raise ImportError(INSTALL_SQL_STORE) from missing
        _log.warning(
            "the SQL store is not installed (pip install 'sagas-orchestrator[sqlalchemy]'): "
            "saga state is kept in memory and lost when the process exits"
        )
        return InMemorySagaStore()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return await plugin.open_store(url, migrate=migrate, **options)


async def close_store(store: SagaRepository) -> None:
    """Release what :func:`open_store` opened (connections; nothing for an in-memory store)."""
    close = getattr(store, "close", None)
    if close is not None:
        await close()
