"""The orchestrator's bounded cache of the sagas it saved last, and the outbox hand-off.

With ``instance_cache`` the orchestrator decides an input on the instance it saved last instead
of loading it first; the save's version check finds an instance that went stale, which is then
dropped, loaded and decided again. With a relay (``use_relay``) each commit's outbox records
are written leased to that relay and handed to it in memory, so it publishes them without a
claim query.
"""

from __future__ import annotations

import builtins
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    ConcurrencyConflict,
    OutboxRecord,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaInstance,
    SagaStatus,
)
from sagas_core import Orchestrator, OutboxRelay, SagaBuilder, SagaRuntime
from sagas_core.codec import decode_command
from sagas_core.definition import SagaDefinition
from sagas_core.testing import FakeClock, InMemoryBus, InMemorySagaStore


class Data(BaseModel):
    order_id: str


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


class Pay(BaseModel):
    order_id: str


SAGA: SagaDefinition = (
    SagaBuilder("order", data=Data)
    .step("reserve")
    .send(Reserve, to="inventory")
    .compensate_with(Release)
    .step("pay")
    .send(Pay, to="payments")
    .build()
)


class CountingStore(InMemorySagaStore):
    """Counts loads and claims."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.claims = 0

    async def load(self, saga_id: str) -> SagaInstance | None:
        self.loads += 1
        return await super().load(saga_id)

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> builtins.list[OutboxRecord]:
        self.claims += 1
        return await super().claim(owner=owner, limit=limit, lease=lease, now=now)


def orchestrator(store: InMemorySagaStore, clock: FakeClock, cache: int = 16) -> Orchestrator:
    return Orchestrator(store=store, definitions=[SAGA], clock=clock, instance_cache=cache)


def last_command(store: InMemorySagaStore) -> CommandMessage:
    return [
        decode_command(row.envelope)
        for row in store.outbox_rows
        if row.envelope.route is RouteKind.COMMAND
    ][-1]


def success(command: CommandMessage, **data: Any) -> ReplyMessage:
    return ReplyMessage(
        message_id=f"{command.message_id}:reply",
        saga_id=command.saga_id,
        saga_type=command.saga_type,
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        status=ReplyStatus.SUCCEEDED,
        data=data,
        in_reply_to=command.message_id,
        created_at=command.created_at,
        reply_token=command.reply_token,  # echoed, as docs/protocol.md asks
    )


async def test_replies_to_a_saga_it_saved_are_decided_without_loading_it() -> None:
    store, clock = CountingStore(), FakeClock()
    orch = orchestrator(store, clock)
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")
    loads = store.loads

    await orch.handle_reply(success(last_command(store)))
    done = await orch.handle_reply(success(last_command(store)))

    assert done is not None
    assert done.instance.status is SagaStatus.COMPLETED
    assert store.loads == loads
    assert await store.load("saga-1") == done.instance


async def test_without_a_cache_every_input_loads_the_saga() -> None:
    store, clock = CountingStore(), FakeClock()
    orch = orchestrator(store, clock, cache=0)
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")
    loads = store.loads

    await orch.handle_reply(success(last_command(store)))

    assert store.loads == loads + 1


async def test_a_saga_another_worker_moved_on_is_reloaded_and_decided_again() -> None:
    store, clock = CountingStore(), FakeClock()
    mine, other = orchestrator(store, clock), orchestrator(store, clock)
    await mine.start("order", Data(order_id="o-1"), saga_id="saga-1")
    reserve = last_command(store)
    await other.handle_reply(success(reserve))  # the other worker got the first reply
    loads = store.loads

    decision = await mine.handle_reply(success(last_command(store)))  # kept: version 1

    assert decision is not None
    assert decision.instance.status is SagaStatus.COMPLETED
    assert decision.instance.version == 3
    assert store.loads == loads + 1  # the stale instance was dropped and the saga loaded
    assert (mine.stale_cache, mine.conflicts) == (1, 0)
    history = [entry.input for entry in await store.history("saga-1")]
    assert history == ["Start", "StepSucceeded", "StepSucceeded"]


async def test_a_duplicate_reply_is_still_refused_with_the_saga_kept() -> None:
    store, clock = CountingStore(), FakeClock()
    orch = orchestrator(store, clock)
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")
    reply = success(last_command(store))
    assert await orch.handle_reply(reply) is not None

    assert await orch.handle_reply(reply) is None

    saga = await store.load("saga-1")
    assert saga is not None
    assert saga.version == 2


async def test_the_cache_keeps_at_most_its_size_and_only_active_sagas() -> None:
    store, clock = CountingStore(), FakeClock()
    orch = orchestrator(store, clock, cache=3)
    for n in range(5):
        await orch.start("order", Data(order_id=f"o-{n}"), saga_id=f"saga-{n}")

    assert orch.unit_of_work.kept == ["saga-2", "saga-3", "saga-4"]  # least recently saved out

    await orch.handle_reply(success(last_command(store)))  # saga-4 moves on: kept, most recent
    await orch.handle_reply(success(last_command(store)))  # saga-4 completes: not kept
    assert orch.unit_of_work.kept == ["saga-2", "saga-3"]


async def test_a_saga_that_could_not_be_saved_is_not_kept() -> None:
    store, clock = CountingStore(), FakeClock()
    orch = orchestrator(store, clock)
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")
    store.fail_next_saves(
        1, ConcurrencyConflict(saga_id="saga-1", expected_version=1, actual_version=2)
    )
    loads = store.loads

    decision = await orch.handle_reply(success(last_command(store)))

    assert decision is not None
    assert store.loads == loads + 1
    assert orch.unit_of_work.kept_copy("saga-1") == decision.instance


# ---------------------------------------------------------------------- outbox hand-off


def with_relay(
    store: InMemorySagaStore, clock: FakeClock, **kwargs: Any
) -> tuple[Orchestrator, OutboxRelay, InMemoryBus]:
    bus = InMemoryBus()
    orch = orchestrator(store, clock)
    relay = OutboxRelay(store=store, bus=bus, clock=clock, owner="relay-mine", **kwargs)
    orch.use_relay(relay)
    return orch, relay, bus


async def test_committed_records_are_handed_to_the_relay_and_published_without_a_claim() -> None:
    store, clock = CountingStore(), FakeClock()
    orch, relay, bus = with_relay(store, clock)

    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")

    assert relay.in_hand == 2  # the command and the started event
    assert await relay._round(claim=False) == 2
    await relay._mark_now()
    assert store.claims == 0
    assert [envelope.route for envelope in bus.published] == [RouteKind.COMMAND, RouteKind.EVENT]
    assert await store.pending_count() == 0
    assert relay.in_hand == 0


async def test_records_of_a_process_that_died_before_publishing_go_out_after_the_lease() -> None:
    store, clock = CountingStore(), FakeClock()
    orch, dead, _ = with_relay(store, clock, lease=timedelta(seconds=30))
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")
    assert dead.in_hand == 2  # committed, handed over, then the process died
    bus = InMemoryBus()
    survivor = OutboxRelay(store=store, bus=bus, clock=clock, owner="relay-other")

    assert await survivor.run_once() == 0  # the dead relay's lease still holds
    clock.advance(timedelta(seconds=31))
    assert await survivor.run_once() == 2

    assert [decode_command(e).step for e in bus.published if e.route is RouteKind.COMMAND] == [
        "reserve"
    ]
    assert await store.pending_count() == 0


async def test_records_written_behind_an_unleased_one_wait_for_the_claim_in_order() -> None:
    store, clock = CountingStore(), FakeClock()
    plain = orchestrator(store, clock)  # no relay: its records are written unleased
    await plain.start("order", Data(order_id="o-1"), saga_id="saga-1")
    orch, relay, bus = with_relay(store, clock)

    await orch.handle_reply(success(last_command(store)))

    assert relay.in_hand == 0  # saga-1 has unsent records the relay does not hold
    assert await relay.run_once() == len(store.outbox_rows)  # all of them, claimed
    steps = [decode_command(e).step for e in bus.published if e.route is RouteKind.COMMAND]
    assert steps == ["reserve", "pay"]


async def add_one(data: Data) -> dict[str, str]:
    return {"order_id": data.order_id + "+"}


LOCAL = SagaBuilder("local", data=Data).step("a").run(add_one).step("b").run(add_one).build()


async def test_a_runtime_publishes_what_it_commits_without_claim_queries() -> None:
    store = CountingStore()
    async with SagaRuntime(sagas=[LOCAL], store=store, relay_poll_interval=60) as runtime:
        started = [
            await runtime.start_saga("local", Data(order_id=f"o-{n}"), saga_id=f"saga-{n}")
            for n in range(5)
        ]
        done = [await runtime.wait_for(saga.saga_id, timeout=5) for saga in started]
        loads = store.loads

    assert {saga.status for saga in done} == {SagaStatus.COMPLETED}
    assert [saga.data["order_id"] for saga in done] == [f"o-{n}++" for n in range(5)]
    assert store.claims == 1  # the relay's first round, at start: nothing was handed over yet
    assert await store.pending_count() == 0
    assert loads == 0  # a start inserts without a load; the replies used the kept sagas


async def test_while_the_relay_holds_its_maximum_commits_leave_their_records_to_the_claim() -> None:
    store, clock = CountingStore(), FakeClock()
    orch, relay, bus = with_relay(store, clock, max_in_hand=2)
    await orch.start("order", Data(order_id="o-1"), saga_id="saga-1")  # command and event
    assert relay.in_hand == 2
    assert not relay.accepts_hand_off

    await orch.start("order", Data(order_id="o-2"), saga_id="saga-2")

    assert relay.in_hand == 2  # saga-2's records were written unleased: nothing more in memory
    assert await relay.run_once() == 2  # what is in hand first
    assert await relay.run_once() == 2  # then saga-2's, claimed
    assert await store.pending_count() == 0
    assert [decode_command(e).saga_id for e in bus.published if e.route is RouteKind.COMMAND] == [
        "saga-1",
        "saga-2",
    ]


async def test_a_restarted_in_process_runtime_publishes_its_predecessors_records_at_once() -> None:
    store = CountingStore()
    dead = SagaRuntime(sagas=[LOCAL], store=store)  # never started: it dies after the commit
    await dead.start_saga("local", Data(order_id="o-1"), saga_id="saga-1")
    assert dead.relay.in_hand == await store.pending_count() > 0

    # The in-process bus reaches one process only: its relay has a fixed name, so the next
    # runtime on the store takes the leased records over without waiting for the lease.
    async with SagaRuntime(sagas=[LOCAL], store=store, relay_lease=3600) as runtime:
        done = await runtime.wait_for("saga-1", timeout=5)

    assert done.status is SagaStatus.COMPLETED
    assert runtime.relay.owner == dead.relay.owner
