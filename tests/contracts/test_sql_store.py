"""The store contract, run against the SQL store on SQLite (a file) and PostgreSQL.

SQLite goes through the embedded default: a fresh file per test, migrated on first use.
PostgreSQL gets tables under a prefix unique to this run, migrated once per session and dropped
at its end; each test starts from empty tables (psycopg 3 and asyncpg take turns).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sagas_abstractions import InboxEntry, InvalidSagaData, SagaRepository
from sagas_sqlalchemy import SqlSagaStore, build_tables, create_store
from sagas_sqlalchemy.migrate import downgrade, upgrade
from tests.contracts.store_contract import T0, SagaStoreContract, insert, make_instance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def pg_prefix(postgres_url: str) -> Iterator[str]:
    """Migrate tables under a prefix unique to this run; drop them when the session ends."""
    prefix = f"sagas_t{uuid.uuid4().hex[:10]}_"
    upgrade(postgres_url, table_prefix=prefix)
    yield prefix
    downgrade(postgres_url, "base", table_prefix=prefix)
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{build_tables(prefix).version_table}"'))
    finally:
        engine.dispose()


async def emptied_store(url: str, prefix: str) -> SqlSagaStore:
    """A store on the session's tables, emptied first."""
    store = create_store(url, table_prefix=prefix)
    tables = store.tables
    async with store.engine.begin() as conn:
        for table in (tables.instances, tables.history, tables.outbox, tables.inbox):
            await conn.execute(sa.delete(table))
    return store


class SqlStoreChecks(SagaStoreContract):
    """What the SQL store adds to the contract; run on every database."""

    async def test_implements_the_repository_protocol(self, store: SagaRepository) -> None:
        assert isinstance(store, SagaRepository)

    async def test_a_row_that_no_longer_parses_raises_invalid_saga_data_naming_the_saga(
        self, store: SagaRepository
    ) -> None:
        assert isinstance(store, SqlSagaStore)
        await store.save([insert(make_instance())])
        instances = store.tables.instances
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(instances).values(status="exploded"))

        with pytest.raises(InvalidSagaData) as caught:
            await store.load("saga-1")

        assert caught.value.saga_id == "saga-1"
        assert caught.value.saga_type == "order"

    async def test_prune_inbox_deletes_only_old_rows(self, store: SagaRepository) -> None:
        assert isinstance(store, SqlSagaStore)
        old = make_instance("old", updated_at=T0)
        new = make_instance("new", updated_at=T0 + timedelta(days=8))
        await store.save(
            [
                insert(old, inbox=_entry("m-old")),
                insert(new, inbox=_entry("m-new")),
            ]
        )

        pruned = await store.prune_inbox(T0 + timedelta(days=1))

        assert pruned == 1
        assert not await store.is_processed("orchestrator", "m-old")
        assert await store.is_processed("orchestrator", "m-new")

    async def test_next_deadline_at_column_follows_the_instance(
        self, store: SagaRepository
    ) -> None:
        assert isinstance(store, SqlSagaStore)
        instance = make_instance(deadline_at=T0 + timedelta(seconds=5))
        await store.save([insert(instance)])
        instances = store.tables.instances
        async with store.engine.connect() as conn:
            stored = await conn.scalar(sa.select(instances.c.next_deadline_at))

        assert stored == instance.next_deadline_at


def _entry(message_id: str) -> InboxEntry:
    return InboxEntry(consumer="orchestrator", message_id=message_id)


class TestSqliteStore(SqlStoreChecks):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SagaRepository]:
        # The embedded default: created and migrated on first use.
        store = create_store(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}")
        try:
            yield store
        finally:
            await store.close()


@pytest.mark.postgres
class TestPostgresStore(SqlStoreChecks):
    @pytest.fixture
    async def store(self, postgres_url: str, pg_prefix: str) -> AsyncIterator[SagaRepository]:
        store = await emptied_store(postgres_url, pg_prefix)
        try:
            yield store
        finally:
            await store.close()


@pytest.mark.postgres
class TestPostgresAsyncpgStore(SqlStoreChecks):
    """The same contract through asyncpg, which the store accepts too."""

    @pytest.fixture
    async def store(self, postgres_url: str, pg_prefix: str) -> AsyncIterator[SagaRepository]:
        url = sa.make_url(postgres_url).set(drivername="postgresql+asyncpg")
        store = await emptied_store(url.render_as_string(hide_password=False), pg_prefix)
        try:
            yield store
        finally:
            await store.close()
