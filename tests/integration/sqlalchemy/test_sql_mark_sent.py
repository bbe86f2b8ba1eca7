"""Marking outbox records sent rides along with saves on PostgreSQL (psycopg).

The relay marks what it published in the background; a record marked sent is deleted. With
sagas moving, the next save's statement carries those ids (no statement, round trip or commit
of its own); with nothing to carry them, they are written alone after a short delay. Either way
a mark is never lost: a statement that fails writes nothing, and its marks go out with the next
one.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa

from sagas_abstractions import DuplicateMessage, InboxEntry, StoreError
from sagas_sqlalchemy import SqlSagaStore
from sagas_sqlalchemy._pg import GroupCommit
from tests.contracts.store_contract import T0, insert, make_envelope, make_instance, update
from tests.integration.sqlalchemy.sql_support import sql_store

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE = timedelta(seconds=30)
BOUND = 10.0  # seconds any single wait below may take before the test fails


@pytest.fixture
def store(psycopg_store: SqlSagaStore) -> SqlSagaStore:
    return psycopg_store


def group(store: SqlSagaStore) -> GroupCommit:
    assert store._group is not None
    return store._group


async def published(store: SqlSagaStore, saga_id: str, count: int) -> list[int]:
    """Write ``count`` commands of a new saga leased to relay-a; returns their outbox ids."""
    saga = make_instance(saga_id)
    records = await store.save_leased(
        [insert(saga, outbox=[make_envelope(f"{saga_id}-m{n}", saga_id) for n in range(count)])],
        owner="relay-a",
        until=T0 + LEASE,
    )
    assert len(records) == count
    return [record.id for record in records]


async def outbox_rows(store: SqlSagaStore) -> int:
    outbox = store._tables.outbox
    async with store._engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) or 0)


async def marking(store: SqlSagaStore, ids: list[int]) -> asyncio.Task[None]:
    """Start marking ``ids`` sent and let it register (it then waits for a statement)."""
    task = asyncio.create_task(store.mark_sent(ids, now=T0))
    await asyncio.sleep(0)
    assert not task.done()
    return task


async def test_the_next_save_carries_the_marks_in_its_own_statement(store: SqlSagaStore) -> None:
    ids = await published(store, "saga-a", 3)
    assert await store.pending_count() == 3

    mark = await marking(store, ids)
    await store.save([insert(make_instance("saga-b"))])
    async with asyncio.timeout(BOUND):
        await mark

    assert await store.pending_count() == 0
    assert await outbox_rows(store) == 0  # published records are deleted
    assert (group(store).marks_carried, group(store).marks_alone) == (1, 0)
    # Sent and released: no relay claims them again.
    assert await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0 + 2 * LEASE) == []


async def test_marks_are_written_alone_when_no_save_comes(store: SqlSagaStore) -> None:
    ids = await published(store, "saga-a", 2)

    async with asyncio.timeout(BOUND):
        await store.mark_sent(ids, now=T0)

    assert await store.pending_count() == 0
    assert (group(store).marks_carried, group(store).marks_alone) == (0, 1)


async def test_a_stale_save_still_carries_the_marks(store: SqlSagaStore) -> None:
    ids = await published(store, "saga-a", 1)
    other = make_instance("saga-b")
    await store.save([insert(other)])

    mark = await marking(store, ids)
    # Expects version 3, the row has 1: the saga is not written, the statement still runs.
    with pytest.raises(Exception, match="saga-b") as refused:
        await store.save([update(other.model_copy(update={"version": 4}))])
    assert type(refused.value).__name__ == "ConcurrencyConflict"
    async with asyncio.timeout(BOUND):
        await mark

    assert await store.pending_count() == 0
    assert (group(store).marks_carried, group(store).marks_alone) == (1, 0)


async def test_marks_of_a_save_that_fails_go_out_with_the_next_statement(
    store: SqlSagaStore,
) -> None:
    ids = await published(store, "saga-a", 2)
    other = make_instance("saga-b")
    await store.save([insert(other, inbox=InboxEntry("orchestrator", "seen"))])
    # Only a statement may carry the marks here: with the usual 20 ms, a slow machine writes
    # them alone before the test can look, and the failed statement's effect goes unseen.
    group(store)._mark_delay = 10 * BOUND

    mark = await marking(store, ids)
    # A duplicate inbox row aborts the whole statement: the marks it carried are not written.
    with pytest.raises(DuplicateMessage):
        await store.save([update(other, inbox=InboxEntry("orchestrator", "seen"))])
    assert not mark.done()
    assert await store.pending_count() == 2

    await store.save([insert(make_instance("saga-c"))])  # the next statement carries them
    async with asyncio.timeout(BOUND):
        await mark

    assert await store.pending_count() == 0
    # Carried twice: by the statement that failed (written nowhere), then by the next one.
    assert (group(store).marks_carried, group(store).marks_alone) == (2, 0)


async def test_saves_written_together_carry_the_marks(store: SqlSagaStore) -> None:
    ids = await published(store, "saga-a", 4)
    sagas = [make_instance(f"saga-{n}") for n in range(20)]

    mark = await marking(store, ids)
    outcomes = await asyncio.gather(*(store.save([insert(saga)]) for saga in sagas))
    async with asyncio.timeout(BOUND):
        await mark

    assert outcomes == [None] * len(sagas)
    assert await store.pending_count() == 0
    assert group(store).marks_alone == 0
    for saga in sagas:
        assert await store.load(saga.saga_id) == saga


async def test_marks_from_many_rounds_share_one_statement(store: SqlSagaStore) -> None:
    first = await published(store, "saga-a", 2)
    second = await published(store, "saga-b", 2)

    marks = [await marking(store, first), await marking(store, second)]
    await store.save([insert(make_instance("saga-c"))])
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*marks)

    assert await store.pending_count() == 0
    assert (group(store).marks_carried, group(store).marks_alone) == (2, 0)


async def test_closing_the_store_writes_the_waiting_marks(postgres_url: str) -> None:
    url = sa.make_url(postgres_url).set(drivername="postgresql+psycopg")
    async with sql_store(url.render_as_string(hide_password=False)) as store:
        ids = await published(store, "saga-a", 2)
        mark = await marking(store, ids)
        async with asyncio.timeout(BOUND):
            await group(store).close()
            await mark
        assert await store.pending_count() == 0


async def test_a_failing_mark_statement_reaches_the_caller_as_a_store_error(
    store: SqlSagaStore,
) -> None:
    ids = await published(store, "saga-a", 1)
    outbox = store._tables.outbox.name
    engine = store._engine
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'ALTER TABLE "{outbox}" RENAME TO "{outbox}_away"'))
    try:
        with pytest.raises(StoreError, match="marking outbox records sent failed"):
            async with asyncio.timeout(BOUND):
                await store.mark_sent(ids, now=T0)
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'ALTER TABLE "{outbox}_away" RENAME TO "{outbox}"'))
    # The relay keeps the ids and marks them again; this time it works.
    async with asyncio.timeout(BOUND):
        await store.mark_sent(ids, now=T0)
    assert await store.pending_count() == 0


async def test_a_row_locked_by_another_transaction_is_skipped_then_deleted_later(
    store: SqlSagaStore, postgres_url: str
) -> None:
    # A relay's claim can hold a published record's row (re-leasing it) while a save carries
    # its mark: waiting for that lock could close a cycle with the claim (a deadlock the
    # server finds only after deadlock_timeout). The mark skips the row and tries again.
    locked, free = await published(store, "saga-a", 2)
    outbox = store._tables.outbox.name
    libpq_url = sa.make_url(postgres_url).set(drivername="postgresql")
    async with await psycopg.AsyncConnection.connect(
        libpq_url.render_as_string(hide_password=False)
    ) as claim:
        await claim.execute(
            f'SELECT id FROM "{outbox}" WHERE id = %s FOR UPDATE',  # noqa: S608 - test table
            (locked,),
        )

        mark = await marking(store, [locked, free])
        async with asyncio.timeout(BOUND):  # not held up by the lock
            await store.save([insert(make_instance("saga-b"))])
        assert not mark.done()  # the locked row is still to delete
        assert await outbox_rows(store) == 1

        await claim.rollback()
    async with asyncio.timeout(BOUND):
        await mark
    assert await outbox_rows(store) == 0


async def test_the_hot_statements_find_outbox_rows_by_index_not_by_scanning_it(
    store: SqlSagaStore,
) -> None:
    # The outbox holds few live rows (published ones are deleted) and many dead ones between
    # vacuums; a fresh table has no statistics. Left alone, the planner scans it whole for every
    # save (and the generic plan keeps doing so): the store's connections forbid that.
    await published(store, "saga-a", 2)
    saga = make_instance("saga-b")
    change = insert(saga, outbox=[make_envelope("m-b", "saga-b")])
    assert store._lane is not None
    assert store._pg is not None
    outbox = store._tables.outbox.name
    query, params = store._pg.save_params(change, owner="relay-a", until=T0 + LEASE)

    async with store._lane.connection() as conn:
        cursor = await conn.execute("EXPLAIN " + query, params)
        plan = "\n".join(row[0] for row in await cursor.fetchall())
        marked = await conn.execute(
            "EXPLAIN " + store._pg.mark_sent,
            {"sent": [1, 2, 3]},
        )
        plan += "\n".join(row[0] for row in await marked.fetchall())

    assert f"Seq Scan on {outbox}" not in plan
    assert f'Seq Scan on "{outbox}"' not in plan
    assert outbox in plan  # the statements do read the outbox (through its indexes)
