"""The outbox across processes: competing relays share it without double publishing, a relay
that dies between publishing and marking sent has its records republished (same message ids)
once its lease runs out, and so are the records a worker committed leased to its own relay
when it dies before publishing them.

Every relay here has its own store and engine, as separate worker processes would.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from sagas_abstractions import (
    Envelope,
    HistoryEntry,
    RouteKind,
    SagaChange,
    SagaInstance,
    SagaStatus,
    StepState,
    StoreError,
)
from sagas_core import Orchestrator, OutboxRelay
from sagas_core.testing import FakeClock, InMemoryBus
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import Tally, long_saga, sql_store, unique_prefix

pytestmark = pytest.mark.integration

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
SAGAS = 20
MESSAGES = 5
RELAYS = 4


def saga_with_messages(saga_id: str, count: int) -> SagaChange:
    instance = SagaInstance(
        saga_id=saga_id,
        saga_type="order",
        definition_version="fp",
        status=SagaStatus.RUNNING,
        current_step=0,
        data={},
        steps=(StepState(name="a"),),
        created_at=T0,
        updated_at=T0,
    )
    return SagaChange(
        instance=instance,
        expected_version=None,
        outbox=[
            Envelope(
                route=RouteKind.COMMAND,
                key="svc",
                message_id=f"{saga_id}:{n}",
                message_type="Do",
                correlation_id=saga_id,
                body=b"{}",
                timestamp=T0,
            )
            for n in range(count)
        ],
        history=[
            HistoryEntry(
                saga_id=saga_id, version=1, at=T0, input="Start", to_status=instance.status
            )
        ],
    )


async def test_competing_claimers_never_share_a_record_and_keep_each_sagas_order(
    url: str,
) -> None:
    prefix = unique_prefix()
    async with sql_store(url, prefix=prefix) as owner:
        await owner.save([saga_with_messages(f"saga-{n:02}", MESSAGES) for n in range(SAGAS)])
        claimers = [SqlSagaStore.from_url(url, table_prefix=prefix) for _ in range(RELAYS)]
        published: list[tuple[str, str]] = []  # (relay, message id), in publishing order
        claimed_ids: list[int] = []

        async def relay(name: str, store: SqlSagaStore) -> None:
            while True:
                records = await store.claim(owner=name, limit=7, lease=LEASE, now=T0)
                if not records:
                    if await store.pending_count() == 0:
                        return
                    await asyncio.sleep(0.001)  # another relay holds the rest: wait for it
                    continue
                claimed_ids.extend(record.id for record in records)
                published.extend((name, record.envelope.message_id) for record in records)
                await asyncio.sleep(0)  # "publishing": let the other relays run
                await store.mark_sent([record.id for record in records], now=T0)

        try:
            await asyncio.gather(*(relay(f"relay-{n}", store) for n, store in enumerate(claimers)))
        finally:
            for store in claimers:
                await store.close()

        assert len(claimed_ids) == len(set(claimed_ids)) == SAGAS * MESSAGES
        by_saga: dict[str, list[int]] = defaultdict(list)
        for _, message_id in published:
            saga_id, number = message_id.rsplit(":", 1)
            by_saga[saga_id].append(int(number))
        assert all(numbers == list(range(MESSAGES)) for numbers in by_saga.values())
        if url.startswith("postgresql"):
            # SQLite serializes writers, so one relay may legitimately take everything there.
            assert len({name for name, _ in published}) > 1  # the work was actually shared
        assert await owner.pending_count() == 0


class CrashBeforeMarkingStore(SqlSagaStore):
    """A worker that dies right after the broker confirmed: mark_sent never happens."""

    async def mark_sent(self, ids: Sequence[int], *, now: datetime) -> None:
        raise StoreError("the process died before marking the records sent")


async def test_a_crash_after_publish_republishes_the_same_message_id_after_the_lease(
    url: str,
) -> None:
    prefix = unique_prefix()
    clock = FakeClock(T0)
    bus = InMemoryBus()
    async with sql_store(url, prefix=prefix) as owner:
        await owner.save([saga_with_messages("saga-1", 2)])
        doomed = CrashBeforeMarkingStore.from_url(url, table_prefix=prefix)
        restarted = SqlSagaStore.from_url(url, table_prefix=prefix)
        try:
            first = OutboxRelay(store=doomed, bus=bus, clock=clock, owner="worker-1", lease=LEASE)
            with pytest.raises(StoreError):
                await first.run_once()
            assert [envelope.message_id for envelope in bus.published] == ["saga-1:0", "saga-1:1"]

            second = OutboxRelay(
                store=restarted, bus=bus, clock=clock, owner="worker-2", lease=LEASE
            )
            clock.advance(LEASE - timedelta(seconds=1))
            assert await second.run_once() == 0  # the dead worker's lease still holds

            clock.advance(timedelta(seconds=2))
            assert await second.run_once() == 2
        finally:
            await doomed.close()
            await restarted.close()

        assert [envelope.message_id for envelope in bus.published] == [
            "saga-1:0",
            "saga-1:1",
            "saga-1:0",
            "saga-1:1",
        ]
        assert await owner.pending_count() == 0


async def test_records_committed_leased_to_a_relay_that_died_go_out_after_the_lease(
    url: str,
) -> None:
    prefix = unique_prefix()
    clock = FakeClock(T0)
    async with sql_store(url, prefix=prefix) as store:
        # The orchestrator of worker 1 commits and hands the records to its relay, then the
        # process dies before the relay publishes anything.
        orchestrator = Orchestrator(store=store, definitions=[long_saga(2)], clock=clock)
        dead = OutboxRelay(
            store=store, bus=InMemoryBus(), clock=clock, owner="worker-1", lease=LEASE
        )
        orchestrator.use_relay(dead)
        saga = await orchestrator.start("long", Tally(), saga_id="saga-1")
        assert dead.in_hand == await store.pending_count() > 0

        survivor = SqlSagaStore.from_url(url, table_prefix=prefix)
        try:
            bus = InMemoryBus()
            relay = OutboxRelay(store=survivor, bus=bus, clock=clock, owner="worker-2")
            assert await relay.run_once() == 0  # the dead relay's lease still holds
            clock.advance(LEASE + timedelta(seconds=1))
            published = await relay.run_once()
        finally:
            await survivor.close()

        assert published == dead.in_hand
        commands = [e for e in bus.published if e.route is RouteKind.COMMAND]
        assert [e.correlation_id for e in commands] == [saga.saga_id]
        assert await store.pending_count() == 0
