"""Engines for the sagas store: URL normalisation and the SQLite connection setup.

PostgreSQL goes through psycopg 3 by default: the same ``postgresql+psycopg://`` URL serves the
async runtime and the synchronous Alembic migrations, and psycopg has no statement cache that
goes stale when another process runs DDL (asyncpg's does). asyncpg URLs work too.

Pooled connections must survive a backend that was terminated while they sat in the pool. With
psycopg that costs no round trip: on checkout, an idle connection whose socket has something to
read has heard from the server, which for an idle connection means its backend went away (a
terminated backend sends its farewell and closes the socket); the pool replaces it. A backend
terminated at the very moment its connection is taken can still fail that one statement, as it
could right after a ping. Other drivers keep ``pool_pre_ping`` (a round trip per checkout).

TLS is asked for in the URL with libpq's parameters (``sslmode``, ``sslrootcert``, ``sslcert``,
``sslkey`` ...), whatever the driver. psycopg hands them to libpq; asyncpg takes them only from a
DSN (SQLAlchemy would pass them as keyword arguments it does not have), so for asyncpg they move
from the URL into a ``dsn`` connect argument, where asyncpg applies libpq's rules itself.

SQLite goes through aiosqlite with WAL journaling (readers never block the writer), a busy
timeout (writers wait for each other instead of failing) and foreign keys on. Python's sqlite3
module would open transactions lazily and only before DML; we switch that off and emit ``BEGIN``
ourselves, ``BEGIN IMMEDIATE`` for writers, so a writer takes the database lock up front and two
writers never deadlock upgrading a read lock.
"""

from __future__ import annotations

import json
import select
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "BEGIN_MODE",
    "UnparseableJSON",
    "async_url",
    "asyncpg_tls_dsn",
    "create_engine",
    "has_pending_input",
    "is_sqlite",
    "lenient_json_loads",
    "sync_url",
]

BEGIN_MODE = "sagas_sqlite_begin"
"""Execution option naming how a SQLite transaction begins (``DEFERRED`` or ``IMMEDIATE``)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000

_ASYNC_DRIVERS = {"postgresql": "psycopg", "sqlite": "aiosqlite"}
_SYNC_DRIVERS = {"asyncpg": "psycopg", "aiosqlite": "pysqlite", "psycopg_async": "psycopg"}
_LIBPQ_TLS_PARAMETERS = frozenset(
    {
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcrl",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
    }
)


def async_url(url: str | URL) -> URL:
    """The async-driver form of ``url``: psycopg for PostgreSQL, aiosqlite for SQLite.

    A URL that names a driver already keeps it (``postgresql+asyncpg://`` stays asyncpg).
    """
    parsed = make_url(url)
    if parsed.drivername == "postgres":
        parsed = parsed.set(drivername="postgresql")
    if "+" not in parsed.drivername and parsed.drivername in _ASYNC_DRIVERS:
        parsed = parsed.set(drivername=f"{parsed.drivername}+{_ASYNC_DRIVERS[parsed.drivername]}")
    return parsed


def sync_url(url: str | URL) -> URL:
    """The synchronous-driver form of ``url`` (for Alembic): psycopg or pysqlite."""
    parsed = async_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _SYNC_DRIVERS:
        parsed = parsed.set(drivername=f"{backend}+{_SYNC_DRIVERS[driver]}")
    if driver == "asyncpg" and "ssl" in parsed.query:
        # asyncpg's ``ssl=<mode>`` is libpq's ``sslmode`` (same values); libpq rejects ``ssl``.
        mode = parsed.query["ssl"]
        parsed = parsed.difference_update_query(["ssl"])
        if "sslmode" not in parsed.query:
            parsed = parsed.update_query_dict({"sslmode": mode})
    return parsed


def is_sqlite(url: str | URL) -> bool:
    """Whether ``url`` points at SQLite."""
    return make_url(url).get_backend_name() == "sqlite"


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """Create the async engine of one store.

    Dead pooled connections are replaced on checkout: with psycopg by a check that needs no
    round trip (see the module docstring), with other server drivers by ``pool_pre_ping``.

    Args:
        url: Database URL; ``postgresql://`` means psycopg 3, ``sqlite:///path`` aiosqlite.
        **kwargs: Passed to :func:`sqlalchemy.ext.asyncio.create_async_engine`.
    """
    parsed = async_url(url)
    psycopg = parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg"
    options: dict[str, Any] = {"pool_pre_ping": not psycopg}
    if parsed.get_backend_name() == "sqlite" and _is_memory(parsed):
        # Every connection to :memory: is its own database: share exactly one.
        options = {"poolclass": StaticPool}
    if parsed.get_backend_name() == "sqlite":
        # SQLite keeps JSON as text, which a hand edit can break: let the row fail to parse
        # (InvalidSagaData naming the saga) instead of the whole query.
        options["json_deserializer"] = lenient_json_loads
    options.update(kwargs)
    if parsed.get_driver_name() == "asyncpg":
        parsed, dsn = asyncpg_tls_dsn(parsed)
        if dsn is not None:
            options["connect_args"] = {"dsn": dsn, **options.get("connect_args", {})}
    engine = create_async_engine(parsed, **options)
    if parsed.get_backend_name() == "sqlite":
        install_sqlite_hooks(engine.sync_engine)
    if psycopg and not options["pool_pre_ping"]:
        install_psycopg_liveness_check(engine.sync_engine)
    return engine


def asyncpg_tls_dsn(url: URL) -> tuple[URL, str | None]:
    """Move libpq's TLS parameters out of an asyncpg ``url`` into a DSN asyncpg reads them from.

    Returns:
        The URL without them, and a ``postgresql://?...`` DSN carrying them (``None`` when there
        were none). asyncpg takes host, user and database from its keyword arguments first, so
        the DSN contributes the TLS settings only.
    """
    tls = {key: value for key, value in url.query.items() if key in _LIBPQ_TLS_PARAMETERS}
    if not tls:
        return url, None
    return url.difference_update_query(tls), "postgresql://?" + urlencode(tls, doseq=True)


def has_pending_input(fd: int) -> bool:
    """Whether a socket has something to read right now (no waiting, no round trip).

    For an idle database connection that means the server spoke first, which it only does
    to say goodbye: the backend was terminated, or the connection broke. A socket that
    cannot be polled counts as broken too.
    """
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


def install_psycopg_liveness_check(engine: Engine) -> None:
    """Replace pooled psycopg connections whose backend went away, on checkout, without a ping."""

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        connection = record.driver_connection
        try:
            fd = connection.pgconn.socket
        except Exception as error:
            raise DisconnectionError("the pooled connection is closed") from error
        if connection.closed or connection.broken or has_pending_input(fd):
            raise DisconnectionError("the pooled connection's backend went away")


class UnparseableJSON(str):
    """Stored JSON text that does not parse, handed on as it is so validation names it."""

    __slots__ = ()


def lenient_json_loads(text: str) -> Any:
    """``json.loads``, but text that is not JSON comes back as :class:`UnparseableJSON`."""
    try:
        return json.loads(text)
    except ValueError:
        return UnparseableJSON(text)


def install_sqlite_hooks(engine: Engine) -> None:
    """Set WAL, busy timeout and foreign keys on every connection; emit ``BEGIN`` explicitly.

    Works for the async engine's ``sync_engine`` and for the sync engine Alembic uses.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(BEGIN_MODE, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")
