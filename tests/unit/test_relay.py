"""The outbox relay: publish committed messages, keep each saga's order, retry failures."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from sagas_abstractions import BusUnavailable, Envelope, OutboxRecord, PublishError, RouteKind
from sagas_core import OutboxRelay
from sagas_core.retry import ExponentialBackoff
from sagas_core.testing import FakeClock, InMemoryBus, InMemorySagaStore
from tests.contracts.store_contract import insert, make_envelope, make_instance
from tests.waiting import eventually

WAIT = 5.0


async def fill(store: InMemorySagaStore, saga_id: str, *message_ids: str) -> None:
    await store.save(
        [insert(make_instance(saga_id), outbox=[make_envelope(m, saga_id) for m in message_ids])]
    )


def relay(store: InMemorySagaStore, bus: InMemoryBus, **kwargs: Any) -> OutboxRelay:
    return OutboxRelay(store=store, bus=bus, clock=FakeClock(), **kwargs)


class PickyBus(InMemoryBus):
    """Refuses every publish that contains one of the given message ids."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused
        self.calls: list[list[str]] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.calls.append([envelope.message_id for envelope in envelopes])
        if any(envelope.message_id in self.refused for envelope in envelopes):
            raise PublishError("nacked")
        await super().publish(envelopes)


async def test_run_once_publishes_a_batch_and_marks_it_sent() -> None:
    store, bus = InMemorySagaStore(), InMemoryBus()
    await fill(store, "saga-1", "m-1", "m-2")
    await fill(store, "saga-2", "m-3")

    assert await relay(store, bus).run_once() == 3

    assert [envelope.message_id for envelope in bus.published] == ["m-1", "m-2", "m-3"]
    assert await store.pending_count() == 0


async def test_a_failed_batch_is_published_one_by_one_holding_back_the_failing_saga() -> None:
    store = InMemorySagaStore()
    bus = PickyBus(refused={"m-1"})
    await fill(store, "saga-1", "m-1", "m-2")
    await fill(store, "saga-2", "m-3")
    outbox = relay(store, bus)

    assert await outbox.run_once() == 0

    assert [envelope.message_id for envelope in bus.published] == ["m-3"]
    assert bus.calls == [["m-1", "m-2", "m-3"], ["m-1"], ["m-3"]]
    assert outbox.failures == 2
    assert outbox.published == 1
    assert await store.pending_count() == 2
    attempts = {row.envelope.message_id: row.attempts for row in store.outbox_rows}
    assert attempts == {"m-1": 1, "m-2": 1, "m-3": 0}


async def test_released_records_go_out_once_their_backoff_is_over() -> None:
    store, bus, clock = InMemorySagaStore(), InMemoryBus(), FakeClock()
    await fill(store, "saga-1", "m-1")
    outbox = OutboxRelay(store=store, bus=bus, clock=clock)
    bus.fail_next_publishes(2)
    assert await outbox.run_once() == 0

    assert await outbox.run_once() == 0
    clock.advance(timedelta(seconds=10))
    assert await outbox.run_once() == 1

    assert [envelope.message_id for envelope in bus.published] == ["m-1"]


async def test_flush_publishes_everything_pending_and_reports_what_remains() -> None:
    store, bus = InMemorySagaStore(), InMemoryBus()
    await fill(store, "saga-1", "m-1", "m-2")

    assert await relay(store, bus, batch_size=1).flush(timeout=WAIT) == 0
    assert len(bus.published) == 2


class SlowClaimStore(InMemorySagaStore):
    """The first claim finds nothing, then waits until the test lets it return."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming = asyncio.Event()
        self.let_go = asyncio.Event()
        self.claims = 0

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> builtins.list[OutboxRecord]:
        self.claims += 1
        found = await super().claim(owner=owner, limit=limit, lease=lease, now=now)
        if self.claims == 1:
            self.claiming.set()
            await self.let_go.wait()
        return found


async def test_a_kick_that_arrives_during_an_empty_round_is_not_lost() -> None:
    store, bus = SlowClaimStore(), InMemoryBus()
    outbox = relay(store, bus, poll_interval=WAIT * 2)
    running = asyncio.create_task(outbox.run())
    try:
        async with asyncio.timeout(WAIT):
            await store.claiming.wait()
            await fill(store, "saga-1", "m-1")  # committed while the relay was claiming...
            outbox.kick()  # ...and the commit kicked it
            store.let_go.set()
            while not bus.published:
                await asyncio.sleep(0.005)
    finally:
        outbox.stop()
        async with asyncio.timeout(WAIT):
            await running

    assert [envelope.route for envelope in bus.published] == [RouteKind.COMMAND]


# ---------------------------------------------------------------------- records handed over


class CountingStore(InMemorySagaStore):
    """Counts claims and mark-sent statements."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.marks: list[list[int]] = []

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> builtins.list[OutboxRecord]:
        self.claims += 1
        return await super().claim(owner=owner, limit=limit, lease=lease, now=now)

    async def mark_sent(self, ids: Sequence[int], *, now: datetime) -> None:
        self.marks.append(list(ids))
        await super().mark_sent(ids, now=now)


async def commit(
    store: InMemorySagaStore, outbox: OutboxRelay, saga_id: str, *message_ids: str
) -> list[OutboxRecord]:
    """Commit a saga with messages leased to the relay, as the orchestrator does."""
    return await store.save_leased(
        [insert(make_instance(saga_id), outbox=[make_envelope(m, saga_id) for m in message_ids])],
        owner=outbox.owner,
        until=outbox.clock.now() + outbox.lease,
    )


async def test_handed_records_go_out_in_one_batch_and_are_marked_sent_in_one_statement() -> None:
    store, bus = CountingStore(), InMemoryBus()
    outbox = relay(store, bus, poll_interval=WAIT * 2)
    outbox.hand_off(await commit(store, outbox, "saga-1", "m-1", "m-2"))
    outbox.hand_off(await commit(store, outbox, "saga-2", "m-3"))
    outbox._claim = False  # nothing else to look for: only what was handed over

    running = asyncio.create_task(outbox.run())
    try:
        async with asyncio.timeout(WAIT):
            while await store.pending_count():
                await asyncio.sleep(0.005)
    finally:
        outbox.stop()
        async with asyncio.timeout(WAIT):
            await running

    assert [envelope.message_id for envelope in bus.published] == ["m-1", "m-2", "m-3"]
    assert store.claims == 0
    assert len(store.marks) == 1
    assert sorted(store.marks[0]) == sorted(record.id for record in store.outbox_rows)
    assert outbox.in_hand == 0


async def test_a_record_handed_over_and_also_claimed_is_published_once() -> None:
    store, bus = CountingStore(), InMemoryBus()
    outbox = relay(store, bus)
    records = await commit(store, outbox, "saga-1", "m-1")
    outbox.hand_off(records)
    outbox.hand_off(records)

    assert await outbox.run_once() == 1  # the records in hand, no claim
    assert await outbox.run_once() == 0  # a claim: nothing left

    assert [envelope.message_id for envelope in bus.published] == ["m-1"]
    assert store.claims == 1


async def test_later_records_of_a_saga_whose_handed_record_failed_wait_and_keep_the_order() -> None:
    store, clock = CountingStore(), FakeClock()
    bus = PickyBus(refused={"m-1"})
    outbox = OutboxRelay(store=store, bus=bus, clock=clock, batch_size=1)
    outbox.hand_off(await commit(store, outbox, "saga-1", "m-1", "m-2"))
    outbox.hand_off(await commit(store, outbox, "saga-2", "m-3"))

    assert await outbox.run_once() == 0  # m-1 fails: released for later, m-2 dropped from hand
    assert outbox.in_hand == 1  # m-3
    assert await outbox.run_once() == 1  # m-3 (saga-2) is not held back
    assert await outbox.run_once() == 0  # m-1 waits for its retry time, m-2 behind it
    bus.refused.clear()
    clock.advance(timedelta(seconds=10))
    assert await outbox.run_once() == 1  # claimed: m-1 (a batch is one record here)
    assert await outbox.run_once() == 1  # then m-2, still leased to this relay

    assert [envelope.message_id for envelope in bus.published] == ["m-3", "m-1", "m-2"]
    assert await store.pending_count() == 0


class BrokenOnceBus(InMemoryBus):
    """Fails the first publish with an unexpected error (not a PublishError)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        if self.broken:
            self.broken = False
            raise RuntimeError("the bus fell over")
        await super().publish(envelopes)


async def test_records_in_hand_survive_an_unexpected_publish_error_and_go_out_next_round() -> None:
    store, bus = CountingStore(), BrokenOnceBus()
    outbox = relay(store, bus)
    outbox.hand_off(await commit(store, outbox, "saga-1", "m-1", "m-2"))

    with pytest.raises(RuntimeError):
        await outbox.run_once()
    assert outbox.in_hand == 2

    assert await outbox.run_once() == 2
    assert [envelope.message_id for envelope in bus.published] == ["m-1", "m-2"]
    assert await store.pending_count() == 0


class AwayBus(InMemoryBus):
    """The broker is away for the first ``away`` publishes (BusUnavailable), or fails otherwise."""

    def __init__(self, away: int, error: Exception | None = None) -> None:
        super().__init__()
        self.away = away
        self.error = error or BusUnavailable("RabbitMQ connection is recovering")
        self.calls: list[list[str]] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.calls.append([envelope.message_id for envelope in envelopes])
        if self.away > 0:
            self.away -= 1
            raise self.error
        await super().publish(envelopes)


async def _run_until_published(outbox: OutboxRelay, bus: AwayBus, count: int) -> None:
    task = asyncio.create_task(outbox.run())
    try:
        await eventually(lambda: len(bus.published) >= count, timeout=WAIT)
    finally:
        outbox.stop()
        await asyncio.wait_for(task, WAIT)


async def test_a_broker_outage_is_logged_once_and_the_records_in_hand_go_out_in_order_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, bus = CountingStore(), AwayBus(away=6)
    outbox = relay(store, bus, backoff=ExponentialBackoff(initial=0.001, maximum=0.005))
    outbox.hand_off(await commit(store, outbox, "saga-1", "m-1", "m-2"))

    with caplog.at_level(logging.DEBUG, logger="sagas.relay"):
        await _run_until_published(outbox, bus, 2)

    assert [envelope.message_id for envelope in bus.published] == ["m-1", "m-2"]
    # The whole batch each time: one by one, every record would have failed alike.
    assert bus.calls == [["m-1", "m-2"]] * 7
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert (
        warnings[0]
        .getMessage()
        .startswith("outbox relay: the broker is unavailable (RabbitMQ connection is recovering)")
    )
    assert warnings[1].getMessage().startswith("outbox relay: back after")
    assert warnings[1].getMessage().endswith("and 6 failed rounds")
    assert all(r.exc_info is None for r in caplog.records)


async def test_a_round_that_fails_for_another_reason_is_logged_with_its_traceback_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = CountingStore()
    bus = AwayBus(away=2, error=RuntimeError("the bus fell over"))
    outbox = relay(store, bus, backoff=ExponentialBackoff(initial=0.001, maximum=0.005))
    outbox.hand_off(await commit(store, outbox, "saga-1", "m-1"))

    with caplog.at_level(logging.WARNING, logger="sagas.relay"):
        await _run_until_published(outbox, bus, 1)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all(r.exc_info is not None for r in errors)
    assert "the bus fell over" in caplog.text


async def test_a_relay_kept_busy_by_hand_offs_still_claims_what_another_process_wrote() -> None:
    # Sagas started by another process (an API without a relay) write records nobody hands
    # over. A relay that is handed records without a pause used to claim only in a lull, so
    # those waited for as long as the load lasted.
    store, bus = CountingStore(), InMemoryBus()
    outbox = relay(store, bus, poll_interval=0.05)
    await fill(store, "from-elsewhere", "elsewhere-1")  # written without a lease
    task = asyncio.create_task(outbox.run())
    handed = 0
    try:
        # The first claim, at start, may take it at once: only one after that proves the point.
        await eventually(lambda: outbox.published > 0)
        await fill(store, "from-elsewhere-2", "elsewhere-2")
        async with asyncio.timeout(WAIT):
            while "elsewhere-2" not in [e.message_id for e in bus.published]:
                handed += 1
                outbox.hand_off(await commit(store, outbox, f"busy-{handed}", f"b-{handed}"))
                await asyncio.sleep(0.005)
    finally:
        outbox.stop()
        await asyncio.wait_for(task, WAIT)

    published = [envelope.message_id for envelope in bus.published]
    assert "elsewhere-2" in published
    assert len(published) == len(set(published))  # nothing twice, though claims re-lease
