"""Bad data parks a saga: a stored row that no longer parses, on SQLite and PostgreSQL.

The row is corrupted by hand, through SQL, as a bad migration or an operator's edit would. The
orchestrator must park that saga (``failed``, ``unreadable_state``), keep it visible, record the
reply that found it so it is not redelivered forever, and keep serving every other saga.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from sagas_abstractions import EventKind, InvalidSagaData, RouteKind, SagaStatus
from sagas_core import Orchestrator
from sagas_core.codec import decode_event
from sagas_core.definition import SagaDefinition
from sagas_core.testing import FakeClock
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import (
    Tally,
    flaky_saga,
    long_saga,
    sql_store,
    success_for,
)

pytestmark = pytest.mark.integration

FLAKY = flaky_saga(attempts=3)


@pytest.fixture
async def store(url: str) -> AsyncIterator[SqlSagaStore]:
    async with sql_store(url) as store:
        yield store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def orchestrator(store: SqlSagaStore, clock: FakeClock) -> Orchestrator:
    return Orchestrator(store=store, definitions=[FLAKY], clock=clock)


async def corrupt(store: SqlSagaStore, saga_id: str) -> None:
    """Break the saga's JSON the way each database allows: bad text on SQLite, bad shape on PG."""
    table = store.tables.instances.name
    if store.engine.dialect.name == "sqlite":
        statement = f"UPDATE {table} SET data = '{{not json', steps = 'oops' WHERE saga_id = :id"  # noqa: S608
    else:
        statement = f"UPDATE {table} SET steps = '[{{\"name\": 5}}]'::jsonb WHERE saga_id = :id"  # noqa: S608
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(statement), {"id": saga_id})


async def raw_steps(store: SqlSagaStore, saga_id: str) -> object:
    table = store.tables.instances.name
    async with store.engine.connect() as conn:
        return await conn.scalar(
            sa.text(f"SELECT CAST(steps AS TEXT) FROM {table} WHERE saga_id = :id"),  # noqa: S608
            {"id": saga_id},
        )


async def test_an_unreadable_row_raises_invalid_saga_data_on_load_and_readers_still_show_it(
    orchestrator: Orchestrator, store: SqlSagaStore
) -> None:
    await orchestrator.start(FLAKY, Tally(), saga_id="bad")
    await orchestrator.start(FLAKY, Tally(), saga_id="good")
    await corrupt(store, "bad")

    with pytest.raises(InvalidSagaData) as caught:
        await store.load("bad")

    assert caught.value.saga_id == "bad"
    shown = await orchestrator.get("bad")
    assert shown.error is not None
    assert shown.error.code == "unreadable_state"
    assert shown.steps == ()
    assert {saga.saga_id for saga in await orchestrator.list()} == {"bad", "good"}


async def test_a_reply_for_an_unreadable_saga_parks_it_once_and_other_sagas_keep_moving(
    orchestrator: Orchestrator, store: SqlSagaStore, clock: FakeClock
) -> None:
    bad = await orchestrator.start(FLAKY, Tally(), saga_id="bad")
    good = await orchestrator.start(FLAKY, Tally(), saga_id="good")
    reply = success_for(bad)
    await corrupt(store, "bad")
    clock.advance(0.5)

    assert await orchestrator.handle_reply(reply) is None

    parked = await orchestrator.get("bad")
    assert parked.status is SagaStatus.FAILED
    assert parked.error is not None
    assert parked.error.code == "unreadable_state"
    assert "'bad'" in parked.error.message
    last = (await orchestrator.history("bad"))[-1]
    assert (last.input, last.to_status, last.message_id) == (
        "Park",
        SagaStatus.FAILED,
        reply.message_id,
    )
    assert await store.is_processed(orchestrator.consumer, reply.message_id)
    assert await orchestrator.handle_reply(reply) is None  # a redelivery is a duplicate
    assert len(await orchestrator.history("bad")) == 2
    assert [saga.saga_id for saga in await orchestrator.list(status=SagaStatus.FAILED)] == ["bad"]
    events = [
        decode_event(record.envelope)
        for record in await store.claim(owner="t", limit=50, lease=timedelta(1), now=clock.now())
        if record.envelope.route is RouteKind.EVENT
    ]
    assert [(e.saga_id, e.kind) for e in events if e.kind is EventKind.FAILED] == [
        ("bad", EventKind.FAILED)
    ]

    done = await orchestrator.handle_reply(success_for(good))

    assert done is not None
    assert done.instance.status is SagaStatus.COMPLETED


async def test_a_due_unreadable_saga_is_parked_and_leaves_the_deadline_scan(
    orchestrator: Orchestrator, store: SqlSagaStore, clock: FakeClock
) -> None:
    await orchestrator.start(FLAKY, Tally(), saga_id="bad")
    await orchestrator.start(FLAKY, Tally(), saga_id="good")
    await corrupt(store, "bad")
    clock.advance(1.5)

    assert await orchestrator.fire_due() == 2  # "bad" parked, "good" timed out

    assert (await orchestrator.get("bad")).status is SagaStatus.FAILED
    good = await orchestrator.get("good")
    assert good.attempt == 1
    assert good.next_deadline_at is not None
    due = await store.due(clock.now() + timedelta(days=1), 10)
    assert [saga.saga_id for saga in due] == ["good"]
    clock.advance(1)
    assert await orchestrator.fire_due() == 1  # the retry of "good" goes out
    assert (await orchestrator.get("good")).attempt == 2


async def test_an_operator_resolves_an_unreadable_saga_and_its_row_is_left_for_repair(
    orchestrator: Orchestrator, store: SqlSagaStore
) -> None:
    bad = await orchestrator.start(FLAKY, Tally(), saga_id="bad")
    await corrupt(store, "bad")
    await orchestrator.handle_reply(success_for(bad))
    corrupted = await raw_steps(store, "bad")

    resolved = await orchestrator.resolve("bad", actor="erin", note="checked the order by hand")

    assert resolved.status is SagaStatus.RESOLVED
    assert (await orchestrator.get("bad")).status is SagaStatus.RESOLVED
    assert await raw_steps(store, "bad") == corrupted
    last = (await orchestrator.history("bad"))[-1]
    assert (last.input, last.actor) == ("Resolve", "erin")


@pytest.mark.parametrize(
    ("started_under", "code"),
    [
        pytest.param(long_saga(1), "unknown_saga_type", id="unregistered-type"),
        pytest.param(
            flaky_saga(attempts=3, destination="tally"),
            "definition_changed",
            id="changed-definition",
        ),
    ],
)
async def test_a_saga_the_worker_has_no_definition_for_is_parked_and_the_others_keep_moving(
    store: SqlSagaStore, clock: FakeClock, started_under: SagaDefinition, code: str
) -> None:
    before = Orchestrator(store=store, definitions=[started_under], clock=clock)
    bad = await before.start(started_under, Tally(), saga_id="bad")
    worker = Orchestrator(store=store, definitions=[FLAKY], clock=clock)
    await worker.start(FLAKY, Tally(), saga_id="good")
    reply = success_for(bad)

    assert await worker.handle_reply(reply) is None
    assert await worker.handle_reply(reply) is None  # the redelivery is a duplicate

    parked = await worker.get("bad")
    assert parked.status is SagaStatus.FAILED
    assert parked.error is not None
    assert parked.error.code == code
    assert [saga.saga_id for saga in await worker.list(status=SagaStatus.FAILED)] == ["bad"]
    assert [(e.input, e.outcome) for e in await worker.history("bad")] == [
        ("Start", "applied"),
        ("Park", "applied"),
    ]
    clock.advance(1.5)
    assert await worker.fire_due() == 1  # only "good" is still due
    clock.advance(1)
    assert await worker.fire_due() == 1
    retried = await worker.get("good")
    assert retried.attempt == 2
    done = await worker.handle_reply(success_for(retried))
    assert done is not None
    assert done.instance.status is SagaStatus.COMPLETED
