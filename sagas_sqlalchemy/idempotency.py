"""Durable, transactional idempotency for participants whose effects live in a SQL database.

A participant that crashes after applying an effect but before replying gets the command again.
With an in-memory outcome cache it would apply the effect twice. With this store, the handler's
writes and the recorded outcome commit in one transaction, so they exist together or not at all:

```python
store = SqlIdempotencyStore.from_url("postgresql+psycopg://payments@db/payments")
await store.create_table()
payments = Participant("payments", idempotency=store)

@payments.handles(ProcessPayment)
async def pay(cmd: ProcessPayment, db: AsyncConnection) -> PaymentProcessed:
    await db.execute(charges.insert().values(order_id=cmd.order_id, amount=cmd.amount))
    return PaymentProcessed(...)
```

The handler's ``AsyncConnection`` parameter is the unit of work's transaction. Execute and
compensate of one saga step are serialized across processes (a row lock on PostgreSQL, the
database write lock on SQLite), so a compensation never races the execution it undoes.

Outcomes are kept until :meth:`SqlIdempotencyStore.prune` removes them: keep them at least as
long as a command can be redelivered or retried (the saga timeout, or a few days).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagas_abstractions import ErrorInfo, ReplyStatus
from sagas_abstractions.ports import CachedOutcome
from sagas_sqlalchemy._errors import store_error
from sagas_sqlalchemy.engine import BEGIN_MODE, create_engine
from sagas_sqlalchemy.tables import JSONType, UTCDateTime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

__all__ = ["SqlIdempotencyStore", "build_outcomes_table"]

_LOCK = "lock"


def build_outcomes_table(
    name: str = "sagas_participant_outcomes", metadata: sa.MetaData | None = None
) -> sa.Table:
    """The table of participant outcomes (add it to your own migrations if you manage DDL)."""
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("data", JSONType, nullable=False),
        sa.Column("error", JSONType, nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False, index=True),
    )


class _SqlUnitOfWork:
    def __init__(self, store: SqlIdempotencyStore, connection: AsyncConnection) -> None:
        self._store = store
        self._connection = connection
        self.resources: Mapping[type, object] = {AsyncConnection: connection}

    async def lock(self, key: str) -> None:
        await self._store._lock(self._connection, key)  # noqa: SLF001 - same module family

    async def get(self, key: str) -> CachedOutcome | None:
        return await self._store._get(self._connection, key)  # noqa: SLF001

    async def put(self, key: str, outcome: CachedOutcome) -> None:
        await self._store._put(self._connection, key, outcome)  # noqa: SLF001


class SqlIdempotencyStore:
    """A :class:`~sagas_abstractions.ports.TransactionalIdempotencyStore` on PostgreSQL or SQLite.

    Args:
        engine: The participant's engine (the one its handlers write their effects with).
        table_name: Name of the outcomes table.
        owns_engine: Whether :meth:`close` disposes the engine.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        table_name: str = "sagas_participant_outcomes",
        owns_engine: bool = False,
    ) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._dialect = engine.dialect.name
        self.table = build_outcomes_table(table_name)

    @classmethod
    def from_url(
        cls, url: str, *, table_name: str = "sagas_participant_outcomes", **engine_options: Any
    ) -> SqlIdempotencyStore:
        """A store with its own engine (``close()`` disposes it)."""
        return cls(create_engine(url, **engine_options), table_name=table_name, owns_engine=True)

    @property
    def engine(self) -> AsyncEngine:
        """The engine handlers' transactions come from."""
        return self._engine

    @property
    def resource_types(self) -> frozenset[type]:
        """Handlers may ask for the transaction's ``AsyncConnection``."""
        return frozenset({AsyncConnection})

    async def create_table(self) -> None:
        """Create the outcomes table if it does not exist."""
        with self._translate("creating the participant outcomes table failed"):
            async with self._engine.begin() as connection:
                await connection.run_sync(self.table.metadata.create_all)

    async def drop_table(self) -> None:
        """Drop the outcomes table (tests, teardown)."""
        with self._translate("dropping the participant outcomes table failed"):
            async with self._engine.begin() as connection:
                await connection.run_sync(self.table.metadata.drop_all)

    async def close(self) -> None:
        """Dispose the engine if this store created it."""
        if self._owns_engine:
            await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[_SqlUnitOfWork]:
        """One transaction: commits when the block ends normally, rolls back otherwise."""
        with self._translate("a participant transaction failed"):
            async with self._engine.connect() as connection:
                if self._dialect == "sqlite":
                    await connection.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
                async with connection.begin():
                    yield _SqlUnitOfWork(self, connection)

    async def get(self, key: str) -> CachedOutcome | None:
        """The outcome recorded for ``key``, if any."""
        with self._translate("reading a participant outcome failed"):
            async with self._engine.connect() as connection:
                return await self._get(connection, key)

    async def put(self, key: str, outcome: CachedOutcome) -> None:
        """Record ``outcome`` for ``key`` in a transaction of its own."""
        async with self.unit_of_work() as unit:
            await unit.put(key, outcome)

    async def prune(self, *, recorded_before: datetime) -> int:
        """Delete outcomes recorded before ``recorded_before``; returns how many."""
        with self._translate("pruning participant outcomes failed"):
            async with self._engine.begin() as connection:
                result = await connection.execute(
                    self.table.delete().where(self.table.c.recorded_at < recorded_before)
                )
                return int(result.rowcount or 0)

    # ------------------------------------------------------------------ statements

    async def _lock(self, connection: AsyncConnection, key: str) -> None:
        if self._dialect == "sqlite":
            return  # BEGIN IMMEDIATE already holds the database write lock
        lock_key = f"{_LOCK}:{key}"
        await connection.execute(
            postgresql.insert(self.table)
            .values(key=lock_key, status=_LOCK, data={}, recorded_at=datetime.now(UTC))
            .on_conflict_do_nothing()
        )
        await connection.execute(
            sa.select(self.table.c.key).where(self.table.c.key == lock_key).with_for_update()
        )

    async def _get(self, connection: AsyncConnection, key: str) -> CachedOutcome | None:
        row = (
            await connection.execute(
                sa.select(self.table.c.status, self.table.c.data, self.table.c.error).where(
                    self.table.c.key == key
                )
            )
        ).first()
        if row is None or row.status == _LOCK:
            return None
        error = None if row.error is None else ErrorInfo.model_validate(row.error)
        return CachedOutcome(ReplyStatus(row.status), dict(row.data or {}), error)

    async def _put(self, connection: AsyncConnection, key: str, outcome: CachedOutcome) -> None:
        values = {
            "key": key,
            "status": outcome.status.value,
            "data": outcome.data,
            "error": None if outcome.error is None else outcome.error.model_dump(mode="json"),
            "recorded_at": datetime.now(UTC),
        }
        insert = (postgresql if self._dialect == "postgresql" else sqlite).insert(self.table)
        statement = insert.values(**values).on_conflict_do_update(
            index_elements=[self.table.c.key],
            set_={name: value for name, value in values.items() if name != "key"},
        )
        await connection.execute(statement)

    @contextlib.contextmanager
    def _translate(self, message: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as error:
            raise store_error(message, error) from error
