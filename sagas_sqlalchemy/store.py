"""The SQL saga store: every state port over four tables, with optimistic concurrency.

One :meth:`SqlSagaStore.save` is one database transaction: the saga rows (inserted, or updated
``WHERE saga_id = :id AND version = :v``), the history rows, the outbox rows and the inbox row
commit together or not at all. Driver errors never leak: they are translated into
:mod:`sagas_abstractions.errors` with the saga named and the driver error as ``__cause__``.

Outbox claims keep each saga's messages in order across competing relays. A claim first locks
the *head* (earliest unsent record) of each saga it takes (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, the database write lock of ``BEGIN IMMEDIATE`` on SQLite), then leases the saga's
following records up to the first one it may not take. Whoever holds a saga's head holds the
saga, so two relays never lease records of one saga at the same time.

Deadline claims work the same way for competing timeout services (:meth:`SqlSagaStore.claim_due`):
one ``UPDATE ... WHERE saga_id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`` on PostgreSQL,
the same under ``BEGIN IMMEDIATE`` on SQLite. They are a hint that spares the workers wasted
races; the version check is what makes each deadline fire once.

On PostgreSQL through psycopg 3 the hot operations (:meth:`SqlSagaStore.save`,
:meth:`~SqlSagaStore.save_leased`, :meth:`~SqlSagaStore.load`, :meth:`~SqlSagaStore.mark_sent`,
:meth:`~SqlSagaStore.claim_due`) skip SQLAlchemy: each is one prebuilt statement on a psycopg
connection of the store's own, one round trip, a save included (see ``sagas_sqlalchemy._pg``).
Everything else, and every operation on SQLite and asyncpg, goes through SQLAlchemy Core.

Inbox pruning policy: an inbox row only has to outlive every redelivery of its message. Brokers
redeliver within minutes to hours; keep a generous margin (default advice: 7 days) and call
:meth:`SqlSagaStore.prune_inbox` periodically. A reply that arrives after its inbox row was
pruned is still harmless for the orchestrator: its attempt number is no longer current, so the
engine records it as stale and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    Envelope,
    ErrorInfo,
    HistoryEntry,
    InvalidSagaData,
    OutboxRecord,
    RouteKind,
    SagaChange,
    SagaError,
    SagaInstance,
    SagaStatus,
)
from sagas_sqlalchemy._errors import store_error
from sagas_sqlalchemy.engine import BEGIN_MODE, create_engine
from sagas_sqlalchemy.migrate import upgrade_engine
from sagas_sqlalchemy.tables import DEFAULT_TABLE_PREFIX, SagaTables, build_tables

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
    from datetime import timedelta

    from sqlalchemy.engine import URL, RowMapping
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from sagas_sqlalchemy._pg import GroupCommit, PgLane, PgStatements

__all__ = ["DEFAULT_SLOW_STATEMENT_SECONDS", "SqlSagaStore", "create_store"]

_log = logging.getLogger("sagas.sqlalchemy")

DEFAULT_SLOW_STATEMENT_SECONDS = 1.0
"""A claim or save that takes longer than this is logged as a warning (and counted)."""

# A claim statement looks at this many unsent records per record it may lease (at least
# _CLAIM_WINDOW_MIN), and a claim at no more than _CLAIM_WINDOWS such windows: its cost is
# bounded by its batch size whatever the outbox holds (see SqlSagaStore.claim).
_CLAIM_WINDOW_PER_RECORD = 8
_CLAIM_WINDOW_MIN = 256
_CLAIM_WINDOWS = 4

# PostgreSQL SQLSTATEs that mean "another transaction got in the way; try again".
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

_JSON_FIELDS = frozenset({"data", "steps", "error", "trace_context"})

# Instance columns that are the store's, not the model's.
_STORE_COLUMNS = frozenset({"next_deadline_at", "deadline_claimed_by", "deadline_claimed_until"})

# Written with every new version of a saga row: the claimed deadline has moved.
_NO_CLAIM: dict[str, Any] = {"deadline_claimed_by": None, "deadline_claimed_until": None}


class SqlSagaStore:
    """A :class:`~sagas_abstractions.SagaRepository` over PostgreSQL or SQLite.

    Build it with :func:`create_store` (or :meth:`from_url`), which owns its engine; close it
    with :meth:`close`. It can also wrap an engine the caller owns (then :meth:`close` leaves
    the engine alone).

    Args:
        engine: An async engine (see :func:`sagas_sqlalchemy.engine.create_engine` for the
            SQLite setup it needs).
        table_prefix: Prefix of every table and index name.
        create_tables: Create missing tables from the metadata on first use (no Alembic
            history; handy for tests and throwaway databases).
        migrate: Run the Alembic migrations to head on first use.
        owns_engine: Whether :meth:`close` disposes the engine.
        hot_connections: On PostgreSQL with psycopg: how many connections of its own the store
            keeps for its hot statements (``None``: the engine pool's size). They are opened
            through the engine's pool and then detached from it, so the pool stays free for
            the other queries.
        slow_statement_seconds: A claim or save that takes longer than this is logged as a
            warning naming it, its duration and batch size, and reported to the listeners of
            :meth:`watch_slow_statements` (``None``: never).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        create_tables: bool = False,
        migrate: bool = False,
        owns_engine: bool = False,
        hot_connections: int | None = None,
        slow_statement_seconds: float | None = DEFAULT_SLOW_STATEMENT_SECONDS,
    ) -> None:
        self._engine = engine
        self._slow_seconds = slow_statement_seconds
        self._slow_listeners: list[Callable[[str, float, int], None]] = []
        self._claim_cursors: dict[str, int] = {}
        self._tables = build_tables(table_prefix)
        self._dialect = engine.dialect.name
        self._create_tables = create_tables
        self._migrate = migrate
        self._owns_engine = owns_engine
        self._ready = not (create_tables or migrate)
        self._ready_lock = asyncio.Lock()
        self._pg: PgStatements | None = None
        self._lane: PgLane | None = None
        self._group: GroupCommit | None = None
        if self._dialect == "postgresql" and engine.dialect.driver == "psycopg":
            from sagas_sqlalchemy._pg import (  # noqa: PLC0415 - psycopg only
                GroupCommit,
                PgLane,
                PgStatements,
            )

            self._pg = PgStatements(self._tables)
            if hot_connections is None:
                size = getattr(engine.pool, "size", None)
                hot_connections = size() if callable(size) else 5
            self._lane = PgLane(engine, hot_connections)
            self._group = GroupCommit(self._lane, self._pg)

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        create_tables: bool = False,
        migrate: bool | None = None,
        slow_statement_seconds: float | None = DEFAULT_SLOW_STATEMENT_SECONDS,
        **engine_options: Any,
    ) -> Self:
        """Create a store with its own engine (dead pooled connections replaced on checkout).

        Args:
            url: ``postgresql+psycopg://...`` (``postgresql://`` means psycopg too),
                ``postgresql+asyncpg://...`` or ``sqlite+aiosqlite:///path``.
            table_prefix: Prefix of every table and index name.
            create_tables: Create missing tables from the metadata on first use.
            migrate: Run the migrations to head on first use. ``None`` (the default) migrates
                SQLite, the embedded default, and never a server database: opt in for those.
            slow_statement_seconds: Warn about claims and saves slower than this (see
                :class:`SqlSagaStore`).
            **engine_options: Passed to ``create_async_engine``.
        """
        engine = create_engine(url, **engine_options)
        if migrate is None:
            migrate = engine.dialect.name == "sqlite"
        return cls(
            engine,
            table_prefix=table_prefix,
            create_tables=create_tables,
            migrate=migrate,
            owns_engine=True,
            slow_statement_seconds=slow_statement_seconds,
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine this store uses."""
        return self._engine

    @property
    def tables(self) -> SagaTables:
        """The tables this store uses."""
        return self._tables

    async def close(self) -> None:
        """Release the store's connections (disposes the engine if the store owns it)."""
        if self._group is not None:
            await self._group.close()
        if self._lane is not None:
            await self._lane.close()
        if self._owns_engine:
            await self._engine.dispose()

    async def initialize(self) -> None:
        """Create or migrate the tables now, if asked to, instead of on first use."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:  # another task may have prepared the tables while we waited
                await self._prepare()
                self._ready = True

    async def _prepare(self) -> None:
        with self._translate("preparing the sagas tables failed"):
            if self._migrate:
                await upgrade_engine(self._engine, table_prefix=self._tables.prefix)
            if self._create_tables:
                async with self._write() as conn:
                    await conn.run_sync(self._tables.metadata.create_all)

    async def drop_tables(self) -> None:
        """Drop the four tables and the Alembic version table of this prefix (tests, teardown)."""
        with self._translate("dropping the sagas tables failed"):
            async with self._write() as conn:
                await conn.run_sync(self._tables.metadata.drop_all)
                await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{self._tables.version_table}"'))

    def watch_slow_statements(self, listener: Callable[[str, float, int], None]) -> None:
        """Call ``listener(statement, seconds, batch_size)`` after each slow claim or save.

        Slow means longer than ``slow_statement_seconds``; the store logs a warning either
        way. The runtime passes :meth:`sagas_core.telemetry.Telemetry.record_slow_statement`.
        """
        self._slow_listeners.append(listener)

    def _watch(self, statement: str, seconds: float, batch_size: int) -> None:
        """Warn about (and report) a claim or save that took longer than the threshold."""
        if self._slow_seconds is None or seconds < self._slow_seconds:
            return
        _log.warning(
            "slow %s: %.3f s for a batch of %d (threshold %.3f s)",
            statement,
            seconds,
            batch_size,
            self._slow_seconds,
            extra={"statement": statement, "seconds": seconds, "batch_size": batch_size},
        )
        for listener in self._slow_listeners:
            try:
                listener(statement, seconds, batch_size)
            except Exception:  # noqa: BLE001 - a metric must never fail a claim or a save
                _log.exception("a slow-statement listener failed")

    # ------------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        await self.initialize()
        async with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if self._dialect == "sqlite":
                await conn.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
            async with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _translate(
        self, message: str, *, saga_id: str | None = None, saga_type: str | None = None
    ) -> Iterator[None]:
        try:
            yield
        except (SQLAlchemyError, OSError) as error:
            raise store_error(message, error, saga_id=saga_id, saga_type=saga_type) from error

    def _insert_ignoring_duplicates(self, table: sa.Table) -> sa.Insert:
        if self._dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self._dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        return sa.insert(table)  # elsewhere a duplicate raises IntegrityError (translated)

    # ------------------------------------------------------------------ SagaStore

    async def load(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``.

        Raises:
            InvalidSagaData: The stored row no longer parses as a saga instance.
            StoreError: The database failed.
        """
        if self._lane is not None:
            text = await self._fetch_json("loading the saga failed", saga_id)
            if text is None:
                return None
            from sagas_sqlalchemy._pg import parse_instance  # noqa: PLC0415 - psycopg only

            return parse_instance(text, _instance)
        row = await self._row(saga_id)
        return None if row is None else _instance(row)

    async def _fetch_json(self, message: str, saga_id: str) -> str | None:
        assert self._lane is not None  # noqa: S101 - PostgreSQL hot path only
        assert self._pg is not None  # noqa: S101
        await self.initialize()
        with self._translate_pg(message, saga_id=saga_id):
            async with self._lane.connection() as conn:
                cursor = await conn.execute(self._pg.load, (saga_id,))
                row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def save(self, changes: Sequence[SagaChange]) -> None:
        """Write all changes in one transaction: all of them, or none.

        Raises:
            ConcurrencyConflict: A saga changed since it was loaded, or a saga to insert exists.
            DuplicateMessage: An inbox entry was recorded before.
            StoreError: The database failed.
        """
        await self._save(changes, owner=None, until=None)

    async def save_leased(
        self, changes: Sequence[SagaChange], *, owner: str, until: datetime
    ) -> builtins.list[OutboxRecord]:
        """Save like :meth:`save`, leasing the outbox records written to ``owner`` until ``until``.

        See :class:`~sagas_abstractions.OutboxHandoff`: a change's records are leased only when
        every earlier unsent record of its saga is ``owner``'s too; the leased ones are returned.

        Raises:
            ConcurrencyConflict: A saga changed since it was loaded, or a saga to insert exists.
            DuplicateMessage: An inbox entry was recorded before.
            StoreError: The database failed.
        """
        return await self._save(changes, owner=owner, until=until)

    async def _save(
        self, changes: Sequence[SagaChange], *, owner: str | None, until: datetime | None
    ) -> builtins.list[OutboxRecord]:
        if not changes:
            return []
        await self.initialize()
        started = time.perf_counter()
        try:
            return await self._save_changes(changes, owner=owner, until=until)
        finally:
            self._watch("save", time.perf_counter() - started, len(changes))

    async def _save_changes(
        self, changes: Sequence[SagaChange], *, owner: str | None, until: datetime | None
    ) -> builtins.list[OutboxRecord]:
        if self._lane is not None:
            return await self._save_pg(changes, owner=owner, until=until)
        current = changes[0]
        leased: list[OutboxRecord] = []
        try:
            async with self._write() as conn:
                for change in changes:
                    current = change
                    leased.extend(await self._save_one(conn, change, owner=owner, until=until))
        except (SQLAlchemyError, OSError) as error:
            conflict = isinstance(error, DBAPIError) and _sqlstate(error) in _RETRYABLE_SQLSTATES
            raise _save_failed(error, current, len(changes), conflict=conflict) from error
        return leased

    async def _save_pg(
        self, changes: Sequence[SagaChange], *, owner: str | None, until: datetime | None
    ) -> builtins.list[OutboxRecord]:
        import psycopg  # noqa: PLC0415 - psycopg only

        from sagas_sqlalchemy._pg import execute_change, retryable  # noqa: PLC0415

        assert self._lane is not None  # noqa: S101 - PostgreSQL hot path only
        assert self._pg is not None  # noqa: S101
        assert self._group is not None  # noqa: S101
        current = changes[0]
        leased: list[OutboxRecord] = []
        try:
            if len(changes) == 1:  # one statement (maybe shared with other sagas' changes)
                return await self._group.save(current, owner=owner, until=until)
            async with self._lane.connection() as conn, conn.transaction():
                for change in changes:
                    current = change
                    leased.extend(
                        await execute_change(conn, self._pg, change, owner=owner, until=until)
                    )
        except (psycopg.Error, SQLAlchemyError, OSError) as error:  # SQLAlchemy: connecting
            conflict = isinstance(error, psycopg.Error) and retryable(error)
            raise _save_failed(error, current, len(changes), conflict=conflict) from error
        return leased

    @contextlib.contextmanager
    def _translate_pg(
        self, message: str, *, saga_id: str | None = None, saga_type: str | None = None
    ) -> Iterator[None]:
        import psycopg  # noqa: PLC0415 - psycopg only

        try:
            yield
        except (psycopg.Error, SQLAlchemyError, OSError) as error:  # SQLAlchemy: connecting
            raise store_error(message, error, saga_id=saga_id, saga_type=saga_type) from error

    async def _save_one(
        self,
        conn: AsyncConnection,
        change: SagaChange,
        *,
        owner: str | None = None,
        until: datetime | None = None,
    ) -> builtins.list[OutboxRecord]:
        instance = change.instance
        table = self._tables.instances
        if change.status_only:
            if change.expected_version is None:
                raise ValueError("a status_only change updates a saga: set expected_version")
            updated = await conn.execute(
                sa.update(table)
                .where(
                    table.c.saga_id == instance.saga_id,
                    table.c.version == change.expected_version,
                )
                .values(_status_row(instance))
            )
            if updated.rowcount != 1:
                await self._conflict(conn, change)
        elif change.expected_version is None:
            # RETURNING, not rowcount: psycopg reports -1 for INSERT ... ON CONFLICT.
            inserted = await conn.scalar(
                self._insert_ignoring_duplicates(table)
                .values(_instance_row(instance))
                .returning(table.c.version)
            )
            if inserted is None:
                await self._conflict(conn, change)
        else:
            values: Mapping[str, Any] = (
                _instance_row(instance)
                if instance.version > change.expected_version
                # The saga row stays as it is, but the version check (and its row lock) holds.
                else {"version": table.c.version}
            )
            updated = await conn.execute(
                sa.update(table)
                .where(
                    table.c.saga_id == instance.saga_id,
                    table.c.version == change.expected_version,
                )
                .values(values)
            )
            if updated.rowcount != 1:
                await self._conflict(conn, change)
        if change.history:
            await conn.execute(
                sa.insert(self._tables.history), [_history_row(entry) for entry in change.history]
            )
        leased: list[OutboxRecord] = []
        if change.outbox:
            outbox = self._tables.outbox
            held = owner is not None and not await conn.scalar(
                sa.select(sa.literal(1))
                .where(
                    outbox.c.saga_id == instance.saga_id,
                    outbox.c.sent_at.is_(None),
                    sa.or_(outbox.c.claimed_by.is_(None), outbox.c.claimed_by != owner),
                )
                .limit(1)
            )
            lease = {"claimed_by": owner, "claimed_until": until} if held else {}
            rows = [_outbox_row(instance, envelope) | lease for envelope in change.outbox]
            if held:
                ids = list(
                    await conn.scalars(
                        sa.insert(outbox).returning(outbox.c.id, sort_by_parameter_order=True),
                        rows,
                    )
                )
                leased = [
                    OutboxRecord(
                        id=row_id,
                        saga_id=instance.saga_id,
                        envelope=envelope,
                        created_at=instance.updated_at,
                    )
                    for row_id, envelope in zip(ids, change.outbox, strict=True)
                ]
            else:
                await conn.execute(sa.insert(outbox), rows)
        if change.inbox is not None:
            inbox = self._tables.inbox
            recorded = await conn.scalar(
                self._insert_ignoring_duplicates(inbox)
                .values(
                    consumer=change.inbox.consumer,
                    message_id=change.inbox.message_id,
                    processed_at=instance.updated_at,
                )
                .returning(inbox.c.consumer)
            )
            if recorded is None:
                raise DuplicateMessage(
                    consumer=change.inbox.consumer,
                    message_id=change.inbox.message_id,
                    saga_id=instance.saga_id,
                )
        return leased

    async def _conflict(self, conn: AsyncConnection, change: SagaChange) -> None:
        table = self._tables.instances
        actual = await conn.scalar(
            sa.select(table.c.version).where(table.c.saga_id == change.instance.saga_id)
        )
        raise ConcurrencyConflict(
            saga_id=change.instance.saga_id,
            expected_version=change.expected_version,
            actual_version=actual,
            saga_type=change.instance.saga_type,
        )

    async def is_processed(self, consumer: str, message_id: str) -> bool:
        """Whether the inbox records this message id for this consumer."""
        inbox = self._tables.inbox
        with self._translate(f"reading the inbox of {consumer!r} failed"):
            async with self._read() as conn:
                found = await conn.scalar(
                    sa.select(sa.literal(1)).where(
                        inbox.c.consumer == consumer, inbox.c.message_id == message_id
                    )
                )
        return found is not None

    async def prune_inbox(self, older_than: datetime, *, consumer: str | None = None) -> int:
        """Delete inbox rows processed before ``older_than``; returns how many went.

        See the module docstring for the pruning policy (keep at least the broker's redelivery
        window; a week is a safe default).

        Args:
            older_than: Rows processed strictly before this moment are deleted.
            consumer: Only prune this consumer's rows.
        """
        inbox = self._tables.inbox
        statement = sa.delete(inbox).where(inbox.c.processed_at < older_than)
        if consumer is not None:
            statement = statement.where(inbox.c.consumer == consumer)
        await self.initialize()
        with self._translate("pruning the inbox failed"):
            async with self._write() as conn:
                result = await conn.execute(statement)
        return int(result.rowcount)

    async def prune_outbox(self, sent_before: datetime) -> int:
        """Delete outbox records marked published before ``sent_before``; returns the count.

        Published records are deleted when they are marked sent; this removes those that
        earlier versions kept (with their ``sent_at``).
        """
        outbox = self._tables.outbox
        await self.initialize()
        with self._translate("pruning the outbox failed"):
            async with self._write() as conn:
                result = await conn.execute(
                    sa.delete(outbox).where(
                        outbox.c.sent_at.is_not(None), outbox.c.sent_at < sent_before
                    )
                )
        return int(result.rowcount)

    # ------------------------------------------------------------------ SagaReader

    async def get(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``.

        A stored row that no longer parses is shown with neutral values in place of the fields
        that do not parse and an ``unreadable_state`` error (the row is not changed); so are
        the rows :meth:`find` and :meth:`due` return.

        Raises:
            StoreError: The database failed.
        """
        row = await self._row(saga_id)
        return None if row is None else _readable(row)

    async def _row(self, saga_id: str) -> RowMapping | None:
        table = self._tables.instances
        with self._translate("loading the saga failed", saga_id=saga_id):
            async with self._read() as conn:
                return (
                    (await conn.execute(sa.select(table).where(table.c.saga_id == saga_id)))
                    .mappings()
                    .first()
                )

    async def find(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Return sagas matching every given filter, least recently updated first."""
        table = self._tables.instances
        query = sa.select(table).order_by(table.c.updated_at, table.c.saga_id).limit(limit)
        if status is not None:
            query = query.where(table.c.status == status.value)
        if saga_type is not None:
            query = query.where(table.c.saga_type == saga_type)
        if updated_before is not None:
            query = query.where(table.c.updated_at < updated_before)
        with self._translate("finding sagas failed", saga_type=saga_type):
            async with self._read() as conn:
                rows = (await conn.execute(query)).mappings().all()
        return [_readable(row) for row in rows]

    async def history(self, saga_id: str) -> builtins.list[HistoryEntry]:
        """Return the saga's audit trail, oldest first."""
        table = self._tables.history
        query = sa.select(table).where(table.c.saga_id == saga_id).order_by(table.c.id)
        with self._translate("reading the saga's history failed", saga_id=saga_id):
            async with self._read() as conn:
                rows = (await conn.execute(query)).mappings().all()
        return [_history(row) for row in rows]

    # ------------------------------------------------------------------ DeadlineStore

    async def due(self, now: datetime, limit: int) -> builtins.list[SagaInstance]:
        """Return up to ``limit`` active sagas with ``next_deadline_at <= now``, earliest first.

        ``next_deadline_at`` is written from :attr:`SagaInstance.next_deadline_at` on every
        change (``NULL`` for inactive sagas), so this is one range scan of its index.
        """
        table = self._tables.instances
        query = (
            sa.select(table)
            .where(table.c.next_deadline_at <= now)
            .order_by(table.c.next_deadline_at, table.c.saga_id)
            .limit(limit)
        )
        with self._translate("finding due sagas failed"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).mappings().all()
        return [_readable(row) for row in rows]

    async def claim_due(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta
    ) -> builtins.list[SagaInstance]:
        """Claim up to ``limit`` due sagas for ``owner`` until ``now + lease``, earliest first.

        One statement: ``UPDATE instances SET deadline_claimed_by = :owner,
        deadline_claimed_until = :until WHERE saga_id IN (SELECT saga_id ... WHERE
        next_deadline_at <= :now AND <not claimed by another owner> ORDER BY next_deadline_at
        LIMIT :n) RETURNING *``. On PostgreSQL the inner select locks its rows ``FOR UPDATE SKIP
        LOCKED``, so concurrent claimers pass each other by instead of waiting (a row another
        claimer or a writer holds is left for the next poll); a row claimed by a transaction
        that committed meanwhile is re-checked and dropped. On SQLite the statement runs under
        the database write lock (``BEGIN IMMEDIATE``), so claims are serialized. Saving a new
        version of a saga clears its claim.
        """
        if limit <= 0:
            return []
        await self.initialize()
        if self._lane is not None:
            return await self._claim_due_pg(now, limit, owner=owner, lease=lease)
        table = self._tables.instances
        candidates = (
            sa.select(table.c.saga_id)
            .where(
                table.c.next_deadline_at <= now,
                sa.or_(
                    table.c.deadline_claimed_until.is_(None),
                    table.c.deadline_claimed_until <= now,
                    table.c.deadline_claimed_by == owner,
                ),
            )
            .order_by(table.c.next_deadline_at, table.c.saga_id)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        statement = (
            sa.update(table)
            .where(table.c.saga_id.in_(candidates))
            .values(deadline_claimed_by=owner, deadline_claimed_until=now + lease)
            .returning(*table.c)
        )
        with self._translate(f"claiming due sagas for {owner!r} failed"):
            async with self._write() as conn:
                rows = (await conn.execute(statement)).mappings().all()
        ordered = sorted(rows, key=lambda row: (row["next_deadline_at"], row["saga_id"]))
        return [_readable(row) for row in ordered]

    async def _claim_due_pg(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta
    ) -> builtins.list[SagaInstance]:
        import json  # noqa: PLC0415

        assert self._lane is not None  # noqa: S101 - PostgreSQL hot path only
        assert self._pg is not None  # noqa: S101
        _refuse_naive_now(now)
        params = {"owner": owner, "until": now + lease, "now": now, "limit": limit}
        with self._translate_pg(f"claiming due sagas for {owner!r} failed"):
            async with self._lane.connection() as conn:
                cursor = await conn.execute(self._pg.claim_due, params)
                found = await cursor.fetchall()
        rows: list[dict[str, Any]] = [json.loads(text) for (text,) in found]
        rows.sort(key=lambda row: (_moment(row["next_deadline_at"]), row["saga_id"]))
        return [_readable(row) for row in rows]

    # ------------------------------------------------------------------ OutboxStore

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> builtins.list[OutboxRecord]:
        """Lease up to ``limit`` unsent records to ``owner``, oldest first, in order per saga.

        A record leased by another owner (lease not expired) or waiting for its retry time
        blocks itself and every later record of its saga.

        The work is bounded by ``limit``, not by the outbox: each statement looks at a window
        of the ``_CLAIM_WINDOW_PER_RECORD * limit`` oldest unsent records (after a cursor), and
        a claim looks at no more than ``_CLAIM_WINDOWS`` windows. When those hold too few
        records that may go (the oldest ones are leased elsewhere or wait for a retry), the
        next claim of ``owner`` goes on after them, and starts from the oldest again once it
        has reached the newest record or filled a batch, so nothing waits for ever.
        """
        if limit <= 0:
            return []
        await self.initialize()
        window = max(limit * _CLAIM_WINDOW_PER_RECORD, _CLAIM_WINDOW_MIN)
        after = self._claim_cursors.pop(owner, 0)
        claimed: list[OutboxRecord] = []
        started = time.perf_counter()
        for _ in range(_CLAIM_WINDOWS):
            records, walked, last = await self._claim_window(
                owner=owner,
                limit=limit - len(claimed),
                lease=lease,
                now=now,
                after=after,
                window=window,
            )
            claimed.extend(records)
            if len(claimed) >= limit or walked < window:
                break
            after = last
        else:
            self._claim_cursors[owner] = after
        self._watch("claim", time.perf_counter() - started, limit)
        return claimed

    async def _claim_window(
        self,
        *,
        owner: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: int,
        window: int,
    ) -> tuple[builtins.list[OutboxRecord], int, int]:
        """Claim from the ``window`` oldest unsent records after id ``after``.

        Returns:
            The records leased, how many unsent records the window held, and its last id.
        """
        if self._lane is not None:
            return await self._claim_window_pg(
                owner=owner, limit=limit, lease=lease, now=now, after=after, window=window
            )
        outbox = self._tables.outbox
        with self._translate(f"claiming outbox records for {owner!r} failed"):
            async with self._write() as conn:
                walk = (
                    (
                        await conn.execute(
                            sa.select(
                                outbox.c.id,
                                outbox.c.saga_id,
                                outbox.c.claimed_by,
                                outbox.c.claimed_until,
                                outbox.c.available_at,
                            )
                            .where(outbox.c.sent_at.is_(None), outbox.c.id > after)
                            .order_by(outbox.c.id)
                            .limit(window)
                        )
                    )
                    .mappings()
                    .all()
                )
                if not walk:
                    return [], 0, after
                last = walk[-1]["id"]
                firsts: dict[str, int] = {}
                for row in walk:
                    firsts.setdefault(row["saga_id"], row["id"])
                candidates = [
                    row["id"]
                    for row in walk
                    if firsts[row["saga_id"]] == row["id"] and _claimable(row, owner=owner, now=now)
                ]
                heads = await self._lock_heads(conn, candidates, owner=owner, limit=limit, now=now)
                chosen = _leasable(walk, heads, owner=owner, now=now)[:limit]
                if not chosen:
                    return [], len(walk), last
                await conn.execute(
                    sa.update(outbox)
                    .where(outbox.c.id.in_(chosen))
                    .values(claimed_by=owner, claimed_until=now + lease)
                )
                rows = (
                    await conn.execute(
                        sa.select(outbox).where(outbox.c.id.in_(chosen)).order_by(outbox.c.id)
                    )
                ).mappings()
                records = [_outbox_record(row) for row in rows]
        return records, len(walk), last

    async def _lock_heads(
        self,
        conn: AsyncConnection,
        candidates: builtins.list[int],
        *,
        owner: str,
        limit: int,
        now: datetime,
    ) -> set[str]:
        """The sagas of ``candidates`` that are heads (no earlier unsent record), locked."""
        if not candidates:
            return set()
        outbox = self._tables.outbox
        earlier = outbox.alias("earlier")
        has_earlier = (
            sa.exists()
            .where(
                earlier.c.saga_id == outbox.c.saga_id,
                earlier.c.sent_at.is_(None),
                earlier.c.id < outbox.c.id,
            )
            .correlate(outbox)
        )
        claimable = sa.and_(
            sa.or_(
                outbox.c.claimed_until.is_(None),
                outbox.c.claimed_until <= now,
                outbox.c.claimed_by == owner,
            ),
            sa.or_(outbox.c.available_at.is_(None), outbox.c.available_at <= now),
        )
        heads = (
            sa.select(outbox.c.saga_id)
            .where(outbox.c.id.in_(candidates), outbox.c.sent_at.is_(None), ~has_earlier, claimable)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            heads = heads.with_for_update(skip_locked=True, of=outbox)
        return set((await conn.scalars(heads)).all())

    async def _claim_window_pg(
        self,
        *,
        owner: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: int,
        window: int,
    ) -> tuple[builtins.list[OutboxRecord], int, int]:
        from sagas_sqlalchemy._pg import outbox_record  # noqa: PLC0415 - psycopg only

        assert self._lane is not None  # noqa: S101 - PostgreSQL hot path only
        assert self._pg is not None  # noqa: S101
        _refuse_naive_now(now)
        params = {
            "owner": owner,
            "until": now + lease,
            "now": now,
            "after": after,
            "window": window,
            "limit": limit,
        }
        with self._translate_pg(f"claiming outbox records for {owner!r} failed"):
            async with self._lane.connection() as conn:
                cursor = await conn.execute(self._pg.claim, params)
                rows = await cursor.fetchall()
        walked, last = rows[0][0], rows[0][1]
        records = [outbox_record(row[2:]) for row in rows if row[2] is not None]
        return records, int(walked), after if last is None else int(last)

    async def mark_sent(self, ids: Sequence[int], *, now: datetime) -> None:
        """Records the bus confirmed are done with: they are deleted from the outbox.

        A published record has no further use (receivers deduplicate by message id; history
        and traces say what was sent), and deleting it writes less than updating it. On
        PostgreSQL the delete rides along with the next save's statement when one comes
        within 20 ms.
        """
        if not ids:
            return
        if self._lane is not None:
            assert self._group is not None  # noqa: S101 - PostgreSQL hot path only
            _refuse_naive_now(now)
            with self._translate_pg("marking outbox records sent failed"):
                await self._group.mark_sent(list(ids))  # with the next save's statement, or alone
            return
        outbox = self._tables.outbox
        with self._translate("marking outbox records sent failed"):
            async with self._write() as conn:
                await conn.execute(sa.delete(outbox).where(outbox.c.id.in_(list(ids))))

    async def release(self, ids: Sequence[int], *, retry_at: datetime, error: str) -> None:
        """Give leased records back after a failed publish; they are claimable at ``retry_at``."""
        if not ids:
            return
        outbox = self._tables.outbox
        with self._translate("releasing outbox records failed"):
            async with self._write() as conn:
                await conn.execute(
                    sa.update(outbox)
                    .where(outbox.c.id.in_(list(ids)), outbox.c.sent_at.is_(None))
                    .values(
                        attempts=outbox.c.attempts + 1,
                        available_at=retry_at,
                        last_error=error,
                        claimed_by=None,
                        claimed_until=None,
                    )
                )

    async def pending_count(self) -> int:
        """How many records wait to be published."""
        outbox = self._tables.outbox
        with self._translate("counting pending outbox records failed"):
            async with self._read() as conn:
                count = await conn.scalar(
                    sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
                )
        return int(count or 0)


def create_store(
    url: str | URL,
    *,
    table_prefix: str = DEFAULT_TABLE_PREFIX,
    create_tables: bool = False,
    migrate: bool | None = None,
    slow_statement_seconds: float | None = DEFAULT_SLOW_STATEMENT_SECONDS,
    **engine_options: Any,
) -> SqlSagaStore:
    """Create a :class:`SqlSagaStore` with its own engine; ``await store.close()`` disposes it.

    ``create_store("sqlite+aiosqlite:///sagas.db")`` is the embedded default: the file and its
    tables are created and migrated on first use. Server databases are migrated only when asked
    (``migrate=True``, or ``sagas migrate`` / :func:`sagas_sqlalchemy.migrate.upgrade`).

    Args:
        url: Database URL (see :meth:`SqlSagaStore.from_url`).
        table_prefix: Prefix of every table and index name.
        create_tables: Create missing tables from the metadata on first use (no migrations).
        migrate: Migrate to head on first use; ``None`` means "SQLite only".
        slow_statement_seconds: Warn about claims and saves slower than this (see
            :class:`SqlSagaStore`).
        **engine_options: Passed to ``create_async_engine``.
    """
    return SqlSagaStore.from_url(
        url,
        table_prefix=table_prefix,
        create_tables=create_tables,
        migrate=migrate,
        slow_statement_seconds=slow_statement_seconds,
        **engine_options,
    )


# ---------------------------------------------------------------------- rows <-> models


def _instance_row(instance: SagaInstance) -> dict[str, Any]:
    # Fresh JSON values on every write: nothing mutated in place can be lost.
    dumped = instance.model_dump(mode="json", include=set(_JSON_FIELDS))
    return {
        "saga_id": instance.saga_id,
        "saga_type": instance.saga_type,
        "definition_version": instance.definition_version,
        "status": instance.status.value,
        "current_step": instance.current_step,
        "attempt": instance.attempt,
        "attempt_base": instance.attempt_base,
        "wait": None if instance.wait is None else instance.wait.value,
        "deadline_at": instance.deadline_at,
        "saga_deadline_at": instance.saga_deadline_at,
        "next_deadline_at": instance.next_deadline_at,
        "data": dumped["data"],
        "steps": dumped["steps"],
        "error": dumped["error"],
        "version": instance.version,
        "created_at": instance.created_at,
        "updated_at": instance.updated_at,
        "correlation_id": instance.correlation_id,
        "trace_context": dumped["trace_context"],
        **_NO_CLAIM,
    }


def _status_row(instance: SagaInstance) -> dict[str, Any]:
    # A status_only change: everything else in the row stays as stored (it may not parse).
    return {
        "status": instance.status.value,
        "error": None if instance.error is None else instance.error.model_dump(mode="json"),
        "wait": None if instance.wait is None else instance.wait.value,
        "deadline_at": instance.deadline_at,
        "next_deadline_at": instance.next_deadline_at,
        "version": instance.version,
        "updated_at": instance.updated_at,
        **_NO_CLAIM,
    }


def _instance(row: Mapping[Any, Any]) -> SagaInstance:
    fields = {key: value for key, value in row.items() if key not in _STORE_COLUMNS}
    try:
        return SagaInstance.model_validate(fields)
    except ValidationError as error:
        raise InvalidSagaData(
            "the stored saga row does not parse as a saga instance: "
            f"{error.error_count()} problem(s), first: {error.errors()[0]['msg']}; "
            "fix the row or resolve the saga by hand",
            saga_id=str(row.get("saga_id")),
            saga_type=str(row.get("saga_type")),
            errors=[dict(problem) for problem in error.errors()],
        ) from error


# What a reader shows in place of a stored field that does not parse.
_NEUTRAL: dict[str, Any] = {
    "saga_type": "unknown",
    "definition_version": "",
    "status": SagaStatus.FAILED,
    "current_step": 0,
    "attempt": 0,
    "attempt_base": 0,
    "wait": None,
    "deadline_at": None,
    "saga_deadline_at": None,
    "data": {},
    "steps": (),
    "error": None,
    "version": 1,
    "correlation_id": None,
    "trace_context": {},
}


def _readable(row: Mapping[Any, Any]) -> SagaInstance:
    """The saga for readers: a row that does not parse is shown, not raised.

    Each field that does not parse is replaced by a neutral value (``{}`` data, no steps, an
    unparseable status shows as ``failed``) and, unless the row carries an error of its own,
    ``error`` says ``unreadable_state`` and why. The row itself is left alone for a human to
    repair; :meth:`SqlSagaStore.load` still raises, so the orchestrator parks the saga.
    """
    try:
        return _instance(row)
    except InvalidSagaData as problem:
        fields = {key: value for key, value in row.items() if key not in _STORE_COLUMNS}
        broken = {
            str(loc[0])
            for error in problem.errors
            if isinstance(loc := error.get("loc"), tuple | list) and loc
        }
        for name in broken:
            if name in _NEUTRAL:
                fields[name] = _NEUTRAL[name]
            elif name in ("created_at", "updated_at"):
                fields[name] = fields["created_at" if name == "updated_at" else "updated_at"]
        if fields["error"] is None:
            fields["error"] = ErrorInfo(code=InvalidSagaData.park_code, message=problem.reason)
        try:
            return SagaInstance.model_validate(fields)
        except ValidationError:
            raise problem from None


def _history_row(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "saga_id": entry.saga_id,
        "version": entry.version,
        "at": entry.at,
        "input": entry.input,
        "outcome": entry.outcome,
        "from_status": None if entry.from_status is None else entry.from_status.value,
        "to_status": entry.to_status.value,
        "step": entry.step,
        "attempt": entry.attempt,
        "kind": None if entry.kind is None else entry.kind.value,
        "reason": entry.reason,
        "actor": entry.actor,
        "message_id": entry.message_id,
    }


def _history(row: RowMapping) -> HistoryEntry:
    return HistoryEntry.model_validate({key: value for key, value in row.items() if key != "id"})


def _outbox_row(instance: SagaInstance, envelope: Envelope) -> dict[str, Any]:
    return {
        "saga_id": instance.saga_id,
        "route": envelope.route.value,
        "key": envelope.key,
        "message_id": envelope.message_id,
        "message_type": envelope.message_type,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
        "headers": dict(envelope.headers),
        "body": envelope.body,
        "timestamp": envelope.timestamp,
        "created_at": instance.updated_at,
        "attempts": 0,
    }


def _outbox_record(row: RowMapping) -> OutboxRecord:
    return OutboxRecord(
        id=row["id"],
        saga_id=row["saga_id"],
        envelope=Envelope(
            route=RouteKind(row["route"]),
            key=row["key"],
            message_id=row["message_id"],
            message_type=row["message_type"],
            correlation_id=row["correlation_id"],
            reply_to=row["reply_to"],
            headers=row["headers"],
            body=bytes(row["body"]),
            timestamp=row["timestamp"],
        ),
        created_at=row["created_at"],
        attempts=row["attempts"],
    )


def _leasable(
    walk: Sequence[RowMapping], heads: set[str], *, owner: str, now: datetime
) -> list[int]:
    """The ids to lease: each head saga's records in ``walk``, up to its first that may not go."""
    chosen: list[int] = []
    blocked: set[str] = set()
    for row in walk:
        saga_id = row["saga_id"]
        if saga_id not in heads or saga_id in blocked:
            continue
        if not _claimable(row, owner=owner, now=now):
            blocked.add(saga_id)  # later messages of this saga must wait
            continue
        chosen.append(row["id"])
    return chosen


def _claimable(row: RowMapping, *, owner: str, now: datetime) -> bool:
    claimed_until: datetime | None = row["claimed_until"]
    available_at: datetime | None = row["available_at"]
    leased_elsewhere = (
        claimed_until is not None and claimed_until > now and row["claimed_by"] != owner
    )
    waiting = available_at is not None and available_at > now
    return not (leased_elsewhere or waiting)


def _refuse_naive_now(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: sagas stores timezone-aware UTC only")


def _moment(value: str | None) -> datetime:
    return datetime.min.replace(tzinfo=UTC) if value is None else datetime.fromisoformat(value)


def _sqlstate(error: DBAPIError) -> str | None:
    original = error.orig
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return code if isinstance(code, str) else None


def _save_failed(
    error: BaseException, change: SagaChange, batch_size: int, *, conflict: bool
) -> SagaError:
    """What a failed save raises: a conflict to reload and reapply, or a store error."""
    saga = change.instance
    if conflict:  # a deadlock or serialization failure: the writer should reload and reapply
        return ConcurrencyConflict(
            saga_id=saga.saga_id,
            expected_version=change.expected_version,
            actual_version=None,
            saga_type=saga.saga_type,
        )
    batch = f" (in a batch of {batch_size} changes)" if batch_size > 1 else ""
    return store_error(
        f"saving the saga failed{batch}, nothing was written",
        error,
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
    )
