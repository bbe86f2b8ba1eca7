"""One transaction per input: a failure anywhere inside a save leaves nothing.

Through SQLAlchemy Core (SQLite, PostgreSQL via asyncpg) a save is several statements in one
transaction: a store subclass fails the save at a chosen statement, after the earlier ones ran
(the saga row is already inserted or updated). On PostgreSQL through psycopg a single change is
one statement: there a value the database refuses (too long for its column) in the history,
outbox or inbox part fails the statement after the saga row was written. Either way the
database must hold neither half afterwards: no new saga version, no history, outbox or inbox
rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from sagas_abstractions import (
    Envelope,
    HistoryEntry,
    InboxEntry,
    RouteKind,
    SagaChange,
    SagaInstance,
    SagaStatus,
    StepState,
    StoreError,
)
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import sql_store, sqlite_url

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", pytest.param("asyncpg", marks=pytest.mark.postgres)])
def core_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database the store writes through SQLAlchemy Core, statement by statement."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    url = sa.make_url(cast("str", request.getfixturevalue("postgres_url")))
    return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture(
    params=[
        pytest.param("psycopg", marks=pytest.mark.postgres),
        pytest.param("asyncpg", marks=pytest.mark.postgres),
    ]
)
def pg_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL through each driver: psycopg takes the one-statement path, asyncpg Core."""
    url = sa.make_url(cast("str", request.getfixturevalue("postgres_url")))
    driver = f"postgresql+{request.param}"
    return url.set(drivername=driver).render_as_string(hide_password=False)


T0 = datetime(2030, 1, 1, tzinfo=UTC)


class _FailingConnection:
    """Passes statements through until one writes to ``table``, then fails like a dead link."""

    def __init__(self, connection: Any, table: sa.Table) -> None:
        self._connection = connection
        self._table = table

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        self._check(statement)
        return await self._connection.execute(statement, *args, **kwargs)

    async def scalar(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        self._check(statement)
        return await self._connection.scalar(statement, *args, **kwargs)

    def _check(self, statement: Any) -> None:
        if isinstance(statement, sa.Insert) and statement.table is self._table:
            raise sa.exc.OperationalError(
                f"INSERT INTO {self._table.name}", {}, ConnectionResetError("injected crash")
            )


class CrashingStore(SqlSagaStore):
    """Fails every save at the insert into one table (its earlier statements have run)."""

    crash_at = "outbox"

    async def _save_one(self, conn: Any, change: SagaChange, **lease: Any) -> Any:
        table = getattr(self.tables, self.crash_at)
        return await super()._save_one(
            cast("Any", _FailingConnection(conn, table)), change, **lease
        )


def saga(version: int) -> SagaInstance:
    return SagaInstance(
        saga_id="saga-1",
        saga_type="order",
        definition_version="fp",
        status=SagaStatus.RUNNING,
        current_step=version - 1,
        data={"version": version},
        steps=(StepState(name="a"), StepState(name="b"), StepState(name="c")),
        version=version,
        created_at=T0,
        updated_at=T0,
    )


def change(version: int, message: str) -> SagaChange:
    instance = saga(version)
    return SagaChange(
        instance=instance,
        expected_version=None if version == 1 else version - 1,
        outbox=[
            Envelope(
                route=RouteKind.COMMAND,
                key="svc",
                message_id=f"cmd-{message}",
                message_type="Do",
                body=b"{}",
                timestamp=T0,
            )
        ],
        history=[
            HistoryEntry(
                saga_id="saga-1", version=version, at=T0, input="X", to_status=instance.status
            )
        ],
        inbox=InboxEntry("orchestrator", message),
    )


async def row_counts(store: SqlSagaStore) -> dict[str, int]:
    tables = store.tables
    counts: dict[str, int] = {}
    async with store.engine.connect() as conn:
        for table in (tables.instances, tables.history, tables.outbox, tables.inbox):
            counts[table.name.removeprefix(tables.prefix)] = int(
                await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0
            )
    return counts


@pytest.mark.parametrize("crash_at", ["history", "outbox", "inbox"])
async def test_a_crash_mid_update_leaves_neither_the_new_state_nor_its_messages(
    core_url: str, crash_at: str
) -> None:
    async with sql_store(core_url) as store:
        await store.save([change(1, "m-1")])
        before = await row_counts(store)
        crashing = CrashingStore(store.engine, table_prefix=store.tables.prefix)
        crashing.crash_at = crash_at

        with pytest.raises(StoreError) as caught:
            await crashing.save([change(2, "m-2")])

        assert caught.value.saga_id == "saga-1"
        assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
        assert await row_counts(store) == before
        assert await store.load("saga-1") == saga(1)
        assert not await store.is_processed("orchestrator", "m-2")
        # The same change goes through once the failure is gone: nothing half-written blocks it.
        await store.save([change(2, "m-2")])
        assert await row_counts(store) == {"instances": 1, "history": 2, "outbox": 2, "inbox": 2}


@pytest.mark.parametrize("crash_at", ["history", "outbox", "inbox"])
async def test_a_crash_mid_insert_leaves_no_saga(core_url: str, crash_at: str) -> None:
    async with sql_store(core_url) as store:
        crashing = CrashingStore(store.engine, table_prefix=store.tables.prefix)
        crashing.crash_at = crash_at

        with pytest.raises(StoreError):
            await crashing.save([change(1, "m-1")])

        assert await row_counts(store) == {"instances": 0, "history": 0, "outbox": 0, "inbox": 0}
        assert await store.load("saga-1") is None


async def test_a_crash_in_the_second_change_of_a_batch_undoes_the_first(core_url: str) -> None:
    async with sql_store(core_url) as store:
        await store.save([change(1, "m-1")])
        crashing = CrashingStore(store.engine, table_prefix=store.tables.prefix)
        crashing.crash_at = "inbox"
        batch: Sequence[SagaChange] = [
            SagaChange(instance=saga(2), expected_version=1, history=change(2, "x").history),
            change(3, "m-3"),
        ]

        with pytest.raises(StoreError):
            await crashing.save(batch)

        assert await store.load("saga-1") == saga(1)
        assert await row_counts(store) == {"instances": 1, "history": 1, "outbox": 1, "inbox": 1}


def refused_by_the_database(good: SagaChange, part: str) -> SagaChange:
    """``good`` with one value too long for its column in the history, outbox or inbox part."""
    too_long = "x" * 401
    if part == "history":
        return replace(good, history=[good.history[0].model_copy(update={"input": too_long})])
    if part == "outbox":
        return replace(good, outbox=[good.outbox[0].model_copy(update={"key": too_long})])
    return replace(good, inbox=InboxEntry("orchestrator", too_long))


@pytest.mark.parametrize("part", ["history", "outbox", "inbox"])
async def test_a_value_refused_mid_update_leaves_neither_the_new_state_nor_its_messages(
    pg_url: str, part: str
) -> None:
    async with sql_store(pg_url) as store:
        await store.save([change(1, "m-1")])
        before = await row_counts(store)

        with pytest.raises(StoreError) as caught:
            await store.save([refused_by_the_database(change(2, "m-2"), part)])

        assert caught.value.saga_id == "saga-1"
        assert await row_counts(store) == before
        assert await store.load("saga-1") == saga(1)
        await store.save([change(2, "m-2")])
        assert await row_counts(store) == {"instances": 1, "history": 2, "outbox": 2, "inbox": 2}


@pytest.mark.parametrize("part", ["history", "outbox", "inbox"])
async def test_a_value_refused_mid_insert_leaves_no_saga(pg_url: str, part: str) -> None:
    async with sql_store(pg_url) as store:
        with pytest.raises(StoreError):
            await store.save([refused_by_the_database(change(1, "m-1"), part)])

        assert await row_counts(store) == {"instances": 0, "history": 0, "outbox": 0, "inbox": 0}
        assert await store.load("saga-1") is None


async def test_a_value_refused_in_the_second_change_of_a_batch_undoes_the_first(
    pg_url: str,
) -> None:
    async with sql_store(pg_url) as store:
        await store.save([change(1, "m-1")])
        batch: Sequence[SagaChange] = [
            SagaChange(instance=saga(2), expected_version=1, history=change(2, "x").history),
            refused_by_the_database(change(3, "m-3"), "inbox"),
        ]

        with pytest.raises(StoreError):
            await store.save(batch)

        assert await store.load("saga-1") == saga(1)
        assert await row_counts(store) == {"instances": 1, "history": 1, "outbox": 1, "inbox": 1}
