"""Connections that die under the store: a terminated backend never fails the next operation.

On PostgreSQL through psycopg the store checks connections without a round trip (no
``pool_pre_ping``): an idle connection whose backend was terminated is found out and replaced,
both among the store's own hot-path connections and in the engine's pool.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from sagas_abstractions import StoreError, StoreUnavailable
from sagas_sqlalchemy import SqlSagaStore, create_engine
from tests.contracts.store_contract import (
    T0,
    insert,
    make_envelope,
    make_history,
    make_instance,
    update,
)
from tests.integration.sqlalchemy.sql_support import sql_store

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def application() -> str:
    return f"sagas-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def store(postgres_url: str, application: str) -> AsyncIterator[SqlSagaStore]:
    url = sa.make_url(postgres_url).update_query_dict({"application_name": application})
    async with sql_store(url.render_as_string(hide_password=False)) as store:
        yield store


async def terminate(postgres_url: str, application: str) -> int:
    """Terminate the store's backends and wait until they are gone (as when they idled since)."""
    engine = create_engine(postgres_url)
    alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
    try:
        async with engine.begin() as conn:
            killed = await conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name"
                ),
                {"name": application},
            )
        async with asyncio.timeout(10):
            while True:
                async with engine.connect() as conn:
                    if not await conn.scalar(alive, {"name": application}):
                        break
                await asyncio.sleep(0.01)
    finally:
        await engine.dispose()
    return int(killed or 0)


def test_psycopg_engines_check_connections_without_a_ping(postgres_url: str) -> None:
    engine = create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
    assert engine.pool._pre_ping is False
    asyncpg = create_engine(sa.make_url(postgres_url).set(drivername="postgresql+asyncpg"))
    assert asyncpg.pool._pre_ping is True


async def test_every_operation_after_the_backends_were_terminated_succeeds(
    store: SqlSagaStore, postgres_url: str, application: str
) -> None:
    saga = make_instance()
    await store.save([insert(saga, outbox=[make_envelope("m-1")])])
    assert await store.find()  # a pooled (SQLAlchemy Core) connection exists too

    assert await terminate(postgres_url, application) >= 2  # the store's and the pool's

    assert await store.load(saga.saga_id) == saga
    assert [found.saga_id for found in await store.find()] == [saga.saga_id]
    await store.save([update(saga)])
    loaded = await store.load(saga.saga_id)
    assert loaded is not None
    assert loaded.version == 2
    assert await store.pending_count() == 1


async def test_a_database_that_does_not_answer_raises_store_errors_naming_the_saga(
    postgres_url: str,
) -> None:
    url = sa.make_url(postgres_url).set(drivername="postgresql+psycopg", port=1)
    store = SqlSagaStore.from_url(url, connect_args={"connect_timeout": 2})
    saga = make_instance()
    try:
        with pytest.raises(StoreError) as caught:
            await store.save([insert(saga)])
        assert caught.value.saga_id == saga.saga_id
        with pytest.raises(StoreError):
            await store.load(saga.saga_id)
        with pytest.raises(StoreError):
            await store.mark_sent([1], now=T0)
    finally:
        await store.close()


async def test_a_database_that_cannot_be_reached_is_unavailable_but_a_refused_statement_is_not(
    postgres_url: str, store: SqlSagaStore
) -> None:
    url = sa.make_url(postgres_url).set(drivername="postgresql+psycopg", port=1)
    unreachable = SqlSagaStore.from_url(url, connect_args={"connect_timeout": 2})
    saga = make_instance(f"saga-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(StoreUnavailable):
            await unreachable.save([insert(saga)])
        with pytest.raises(StoreUnavailable):
            await unreachable.load(saga.saga_id)
    finally:
        await unreachable.close()

    # An attempt number beyond the column's 32 bits: the message's fault, not the worker's.
    with pytest.raises(StoreError) as caught:
        await store.save([insert(saga, history=[make_history(saga, attempt=2**32)])])
    assert not isinstance(caught.value, StoreUnavailable)
