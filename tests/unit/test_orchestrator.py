"""The orchestrator over the in-memory store and a fake clock (it never touches a bus)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, Field

from sagas_abstractions import (
    CommandMessage,
    ConcurrencyConflict,
    ErrorInfo,
    EventKind,
    HistoryEntry,
    InvalidOperation,
    InvalidSagaData,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaAlreadyExists,
    SagaChange,
    SagaInstance,
    SagaNotFound,
    SagaStatus,
    StepKind,
    StoreError,
    UnknownSagaType,
    WaitKind,
)
from sagas_core import (
    Orchestrator,
    OrphanReplyPolicy,
    RetryPolicy,
    SagaBuilder,
    StatusEvents,
    fixed,
)
from sagas_core.codec import decode_command, decode_event
from sagas_core.definition import SagaDefinition
from sagas_core.orchestrator import _uuid4_hex
from sagas_core.testing import FakeClock, InMemorySagaStore


class OrderData(BaseModel):
    order_id: str
    sku: str
    qty: int = Field(gt=0)
    reservation_id: str | None = None


class ReserveInventory(BaseModel):
    order_id: str
    sku: str
    qty: int


class ReleaseInventory(BaseModel):
    order_id: str
    reservation_id: str | None = None


class ProcessPayment(BaseModel):
    order_id: str


class RefundPayment(BaseModel):
    order_id: str


def order_saga(reserve_timeout: float = 10, *, inventory: str = "inventory") -> SagaDefinition:
    return (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to=inventory)
        .compensate_with(ReleaseInventory, retry=RetryPolicy(attempts=1))
        .timeout(seconds=reserve_timeout)
        .retry(attempts=2, backoff=fixed(1))
        .step("pay")
        .send(ProcessPayment, to="payments")
        .compensate_with(RefundPayment)
        .saga_timeout(minutes=5)
        .build()
    )


class RefundData(BaseModel):
    order_id: str


REFUND_SAGA = (
    SagaBuilder("refund", data=RefundData).step("pay").send(RefundPayment, to="payments").build()
)
ORDER_SAGA = order_saga()
DATA = OrderData(order_id="o-1", sku="A-1", qty=2)


class RecordingStore(InMemorySagaStore):
    """Counts loads and save attempts; can yield after a load so two writers interleave."""

    def __init__(self, *, yield_after_load: bool = False) -> None:
        super().__init__()
        self.loads = 0
        self.saves: list[list[SagaChange]] = []
        self.yield_after_load = yield_after_load

    async def load(self, saga_id: str) -> SagaInstance | None:
        self.loads += 1
        instance = await super().load(saga_id)
        if self.yield_after_load:
            await asyncio.sleep(0)
        return instance

    async def save(self, changes: Sequence[SagaChange]) -> None:
        self.saves.append(list(changes))
        await super().save(changes)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def orchestrator(store: RecordingStore, clock: FakeClock) -> Orchestrator:
    return Orchestrator(store=store, definitions=[ORDER_SAGA, REFUND_SAGA], clock=clock)


def commands(store: InMemorySagaStore) -> list[CommandMessage]:
    return [
        decode_command(row.envelope)
        for row in store.outbox_rows
        if row.envelope.route is RouteKind.COMMAND
    ]


def event_kinds(store: InMemorySagaStore) -> list[EventKind]:
    return [
        decode_event(row.envelope).kind
        for row in store.outbox_rows
        if row.envelope.route is RouteKind.EVENT
    ]


def answer(
    command: CommandMessage,
    *,
    data: dict[str, Any] | None = None,
    error: ErrorInfo | None = None,
    message_id: str | None = None,
) -> ReplyMessage:
    return ReplyMessage(
        message_id=message_id or f"{command.message_id}:reply",
        saga_id=command.saga_id,
        saga_type=command.saga_type,
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        status=ReplyStatus.SUCCEEDED if error is None else ReplyStatus.FAILED,
        data=data or {},
        error=error,
        in_reply_to=command.message_id,
        created_at=command.created_at,
        reply_token=command.reply_token,  # echoed, as docs/protocol.md asks
    )


DECLINED = ErrorInfo(code="declined", message="card declined")


async def start(orchestrator: Orchestrator, saga_id: str = "saga-1") -> SagaInstance:
    return await orchestrator.start("order", DATA, saga_id=saga_id)


async def parked_saga(orchestrator: Orchestrator, store: RecordingStore) -> SagaInstance:
    """A saga whose payment failed and whose inventory release failed for good."""
    await start(orchestrator)
    await orchestrator.handle_reply(answer(commands(store)[-1], data={"reservation_id": "r-1"}))
    await orchestrator.handle_reply(answer(commands(store)[-1], error=DECLINED))
    release = commands(store)[-1]
    assert release.kind is StepKind.COMPENSATE
    await orchestrator.handle_reply(answer(release, error=ErrorInfo(code="unreachable")))
    return await orchestrator.get("saga-1")


# ---------------------------------------------------------------------- starting


async def test_start_writes_state_history_and_outbox_in_one_atomic_save(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    saga = await orchestrator.start("order", DATA, saga_id="saga-1", correlation_id="order-o-1")

    [[change]] = store.saves
    assert change.expected_version is None
    assert change.instance == saga
    assert [entry.input for entry in change.history] == ["Start"]
    assert saga.status is SagaStatus.RUNNING
    assert (saga.current_step, saga.attempt, saga.wait) == (0, 1, WaitKind.REPLY)
    assert saga.deadline_at == clock.now() + timedelta(seconds=10)
    assert saga.saga_deadline_at == clock.now() + timedelta(minutes=5)
    assert saga.correlation_id == "order-o-1"
    [reserve] = commands(store)
    assert (reserve.destination, reserve.command_type) == ("inventory", "ReserveInventory")
    assert reserve.payload == {"order_id": "o-1", "sku": "A-1", "qty": 2}
    assert reserve.reply_to == orchestrator.reply_to == "sagas.replies.default"
    assert event_kinds(store) == [EventKind.STARTED]
    assert await store.load("saga-1") == saga
    assert await orchestrator.history("saga-1") == list(change.history)


async def test_starting_with_an_explicit_id_twice_returns_the_first_saga(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    first = await start(orchestrator)

    again = await orchestrator.start(
        "order", {"order_id": "o-2", "sku": "B", "qty": 1}, saga_id="saga-1"
    )

    assert again == first
    assert len(commands(store)) == 1
    assert len(store.saves) == 2  # the second insert was refused (the id exists), then loaded
    assert store.loads == 1


async def test_starting_an_existing_id_as_another_saga_type_raises_saga_already_exists(
    orchestrator: Orchestrator,
) -> None:
    await start(orchestrator)

    with pytest.raises(SagaAlreadyExists) as caught:
        await orchestrator.start("refund", RefundData(order_id="o-1"), saga_id="saga-1")

    assert caught.value.saga_id == "saga-1"
    assert "'order' saga already has this id" in str(caught.value)


async def test_starting_an_existing_id_returns_it_whatever_the_data_and_refuses_another_type(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    first = await start(orchestrator)
    bad = {"order_id": "o-1", "sku": "A-1", "qty": 0}

    again = await orchestrator.start("order", bad, saga_id="saga-1")
    with pytest.raises(SagaAlreadyExists):
        await orchestrator.start("refund", {"order_id": ""}, saga_id="saga-1")
    with pytest.raises(InvalidSagaData):
        await orchestrator.start("order", bad, saga_id="saga-2")

    assert again == first
    assert len(store.saves) == 2  # the first and the refused refund: bad data is never inserted
    assert await store.load("saga-2") is None


async def test_starting_with_data_that_does_not_fit_raises_invalid_saga_data_and_writes_nothing(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    with pytest.raises(InvalidSagaData, match="qty") as caught:
        await orchestrator.start("order", {"order_id": "o-1", "sku": "A-1", "qty": 0})

    assert caught.value.saga_type == "order"
    assert [error["loc"] for error in caught.value.errors] == [("qty",)]
    assert store.saves == []
    assert await store.find() == []
    assert await store.pending_count() == 0


async def test_starting_an_unknown_saga_type_raises_unknown_saga_type_naming_the_known_ones(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    with pytest.raises(UnknownSagaType, match="registered: order, refund"):
        await orchestrator.start("shipping", {})

    assert store.saves == []


async def test_start_generates_ids_with_the_id_factory(
    store: RecordingStore, clock: FakeClock
) -> None:
    ids = iter(["first", "second"])
    orchestrator = Orchestrator(
        store=store, definitions=[ORDER_SAGA], clock=clock, id_factory=lambda: next(ids)
    )

    one = await orchestrator.start("order", DATA)
    two = await orchestrator.start(ORDER_SAGA, DATA)

    assert (one.saga_id, two.saga_id) == ("first", "second")


async def test_a_start_that_loses_a_race_returns_the_winning_saga(
    store: RecordingStore, clock: FakeClock
) -> None:
    store.yield_after_load = True
    one = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    two = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)

    first, second = await asyncio.gather(start(one), start(two))

    assert first == second
    assert len(commands(store)) == 1


# ---------------------------------------------------------------------- replies


async def test_a_reply_is_applied_merged_and_recorded_in_the_inbox(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    reply = answer(commands(store)[0], data={"reservation_id": "r-1", "ignored": 1})

    decision = await orchestrator.handle_reply(reply)

    assert decision is not None
    saga = await orchestrator.get("saga-1")
    assert saga.version == 2
    assert saga.data["reservation_id"] == "r-1"
    assert "ignored" not in saga.data
    assert saga.current_step_name == "pay"
    assert commands(store)[-1].command_type == "ProcessPayment"
    assert await store.is_processed(orchestrator.consumer, reply.message_id)
    assert store.saves[-1][0].inbox is not None
    assert (await orchestrator.history("saga-1"))[-1].message_id == reply.message_id


async def test_a_reply_with_an_id_seen_before_is_ignored(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    reply = answer(commands(store)[0], data={"reservation_id": "r-1"})
    await orchestrator.handle_reply(reply)
    history = await orchestrator.history("saga-1")

    assert await orchestrator.handle_reply(reply) is None

    assert (await orchestrator.get("saga-1")).version == 2
    assert await orchestrator.history("saga-1") == history
    assert len(commands(store)) == 2


async def test_a_stale_reply_is_recorded_in_history_and_inbox_without_changing_the_saga(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    first_attempt = commands(store)[0]
    clock.advance(10)
    await orchestrator.fire_due()
    clock.advance(1)
    await orchestrator.fire_due()
    assert commands(store)[-1].attempt == 2
    version = (await orchestrator.get("saga-1")).version
    late = answer(first_attempt, data={"reservation_id": "r-late"})

    decision = await orchestrator.handle_reply(late)

    assert decision is not None
    assert not decision.changed
    saga = await orchestrator.get("saga-1")
    assert saga.version == version
    assert saga.data["reservation_id"] is None
    last = (await orchestrator.history("saga-1"))[-1]
    assert (last.outcome, last.message_id) == ("stale", late.message_id)
    assert await store.is_processed(orchestrator.consumer, late.message_id)


async def test_an_orphan_reply_under_the_log_policy_is_dropped(
    orchestrator: Orchestrator, store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    await start(orchestrator)
    ghost = answer(commands(store)[0]).model_copy(update={"saga_id": "ghost"})
    saves = len(store.saves)

    assert await orchestrator.handle_reply(ghost) is None

    assert len(store.saves) == saves
    assert "for unknown saga ghost" in caplog.text


async def test_an_orphan_reply_under_the_dead_letter_policy_raises_saga_not_found(
    store: RecordingStore, clock: FakeClock
) -> None:
    orchestrator = Orchestrator(
        store=store,
        definitions=[ORDER_SAGA],
        clock=clock,
        orphan_replies=OrphanReplyPolicy.DEAD_LETTER,
    )
    await start(orchestrator)
    ghost = answer(commands(store)[0]).model_copy(update={"saga_id": "ghost"})

    with pytest.raises(SagaNotFound) as caught:
        await orchestrator.handle_reply(ghost)

    assert (caught.value.saga_id, caught.value.step) == ("ghost", "reserve")


async def test_a_reply_naming_another_saga_type_than_its_saga_is_dropped_as_an_orphan(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    stranger = answer(commands(store)[0]).model_copy(update={"saga_type": "shipping"})

    assert await orchestrator.handle_reply(stranger) is None

    saga = await orchestrator.get("saga-1")
    assert (saga.status, saga.version) == (SagaStatus.RUNNING, 1)


# ---------------------------------------------------------------------- conflicts and failures


async def test_a_version_conflict_reloads_and_reapplies_the_reply(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    reply = answer(commands(store)[0], data={"reservation_id": "r-1"})
    store.fail_next_saves(
        1, ConcurrencyConflict(saga_id="saga-1", expected_version=1, actual_version=2)
    )
    loads = store.loads

    decision = await orchestrator.handle_reply(reply)

    assert decision is not None
    assert decision.changed
    assert orchestrator.conflicts == 1
    assert store.loads - loads == 2
    saga = await orchestrator.get("saga-1")
    assert (saga.version, saga.current_step_name) == (2, "pay")


async def test_a_conflict_that_outlasts_the_retries_is_raised(
    store: RecordingStore, clock: FakeClock
) -> None:
    orchestrator = Orchestrator(
        store=store, definitions=[ORDER_SAGA], clock=clock, max_conflict_retries=2
    )
    await start(orchestrator)
    conflict = ConcurrencyConflict(saga_id="saga-1", expected_version=1, actual_version=2)
    store.fail_next_saves(3, conflict)

    with pytest.raises(ConcurrencyConflict) as caught:
        await orchestrator.handle_reply(answer(commands(store)[0]))

    assert caught.value.saga_id == "saga-1"
    assert orchestrator.conflicts == 3
    assert (await orchestrator.get("saga-1")).version == 1


async def test_a_timeout_that_loses_a_race_with_the_reply_is_dropped_after_reloading(
    clock: FakeClock,
) -> None:
    store = RecordingStore(yield_after_load=True)
    one = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    two = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    await start(one)
    reserve = commands(store)[0]
    clock.advance(10)

    await asyncio.gather(
        one.handle_reply(answer(reserve, data={"reservation_id": "r-1"})), two.fire_due()
    )

    assert one.conflicts + two.conflicts == 1
    saga = await one.get("saga-1")
    assert (saga.version, saga.current_step_name) == (2, "pay")
    assert saga.data["reservation_id"] == "r-1"
    inputs = [entry.input for entry in await one.history("saga-1")]
    assert inputs == ["Start", "StepSucceeded"]


async def test_a_store_failure_propagates_and_nothing_is_written(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    reply = answer(commands(store)[0], data={"reservation_id": "r-1"})
    store.fail_next_saves()

    with pytest.raises(StoreError, match="injected store failure"):
        await orchestrator.handle_reply(reply)

    saga = await orchestrator.get("saga-1")
    assert saga.version == 1
    assert not await store.is_processed(orchestrator.consumer, reply.message_id)
    assert len(commands(store)) == 1
    assert len(await orchestrator.history("saga-1")) == 1


async def test_a_store_failure_during_start_writes_nothing(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    store.fail_next_saves()

    with pytest.raises(StoreError):
        await start(orchestrator)

    assert await store.load("saga-1") is None
    assert await store.pending_count() == 0


async def test_a_reply_for_a_saga_started_under_another_definition_parks_it(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    redeployed = Orchestrator(store=store, definitions=[order_saga(inventory="stock")], clock=clock)

    assert await redeployed.handle_reply(answer(commands(store)[0])) is None

    saga = await redeployed.get("saga-1")
    assert saga.status is SagaStatus.FAILED
    assert saga.error is not None
    assert saga.error.code == "definition_changed"
    assert ORDER_SAGA.fingerprint in saga.error.message


# ---------------------------------------------------------------------- deadlines


async def test_fire_due_times_out_an_attempt_once_even_when_called_twice(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    clock.advance(9)
    assert await orchestrator.fire_due() == 0

    clock.advance(1)
    assert await orchestrator.fire_due() == 1
    assert await orchestrator.fire_due() == 0

    saga = await orchestrator.get("saga-1")
    assert (saga.wait, saga.deadline_at) == (WaitKind.RETRY, clock.now() + timedelta(seconds=1))
    inputs = [entry.input for entry in await orchestrator.history("saga-1")]
    assert inputs == ["Start", "Timeout"]


async def test_fire_due_sends_the_retry_once_its_backoff_is_over(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    clock.advance(10)
    await orchestrator.fire_due()

    clock.advance(1)
    assert await orchestrator.fire_due() == 1
    assert await orchestrator.fire_due() == 0

    retry = commands(store)[-1]
    assert (retry.step, retry.attempt, retry.message_id) == (
        "reserve",
        2,
        "saga-1:reserve:execute:2",
    )
    assert retry.idempotency_key == commands(store)[0].idempotency_key


async def test_two_orchestrators_firing_the_same_deadline_fire_it_once(clock: FakeClock) -> None:
    store = RecordingStore(yield_after_load=True)
    one = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    two = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    await start(one)
    clock.advance(10)

    fired = await asyncio.gather(one.fire_due(), two.fire_due())

    assert sum(fired) == 1
    assert one.conflicts + two.conflicts == 1
    inputs = [entry.input for entry in await one.history("saga-1")]
    assert inputs == ["Start", "Timeout"]


async def test_orchestrators_with_owners_claim_disjoint_due_sagas_and_never_conflict(
    clock: FakeClock,
) -> None:
    store = RecordingStore(yield_after_load=True)
    one = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    two = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    for n in range(4):
        await start(one, f"saga-{n}")
    clock.advance(10)
    loads = store.loads

    fired = await asyncio.gather(
        one.fire_due(limit=2, owner="one"), two.fire_due(limit=2, owner="two")
    )

    assert list(fired) == [2, 2]
    assert one.conflicts + two.conflicts == 0
    assert store.loads - loads == 4  # each due saga loaded once, by the worker that claimed it
    for n in range(4):
        inputs = [entry.input for entry in await one.history(f"saga-{n}")]
        assert inputs == ["Start", "Timeout"]


async def test_fire_due_leaves_sagas_claimed_by_another_owner_until_the_lease_passes(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    clock.advance(10)
    await store.claim_due(clock.now(), 10, owner="dead", lease=timedelta(seconds=3))

    assert await orchestrator.fire_due(owner="alive") == 0
    assert await orchestrator.fire_due() == 1  # without an owner, claims are not looked at
    await start(orchestrator, "saga-2")
    clock.advance(10)
    await store.claim_due(clock.now(), 10, owner="dead", lease=timedelta(seconds=3))
    clock.advance(3)

    assert await orchestrator.fire_due(owner="alive") == 2  # saga-1's retry and saga-2's timeout


async def test_fire_due_fires_the_saga_timeout_once_and_compensates(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    await orchestrator.handle_reply(answer(commands(store)[0], data={"reservation_id": "r-1"}))
    clock.advance(timedelta(minutes=5))

    assert await orchestrator.fire_due() == 1
    assert await orchestrator.fire_due() == 0

    saga = await orchestrator.get("saga-1")
    assert saga.status is SagaStatus.COMPENSATING
    assert saga.error is not None
    assert saga.error.code == "saga_timeout"
    compensations = [c for c in commands(store) if c.kind is StepKind.COMPENSATE]
    assert [c.command_type for c in compensations] == ["RefundPayment"]


# ---------------------------------------------------------------------- operator actions


async def test_an_operator_compensates_a_running_saga_and_is_named_in_history(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    await orchestrator.handle_reply(answer(commands(store)[0], data={"reservation_id": "r-1"}))

    saga = await orchestrator.compensate("saga-1", actor="alice", reason="customer cancelled")

    assert saga.status is SagaStatus.COMPENSATING
    last = (await orchestrator.history("saga-1"))[-1]
    assert (last.input, last.actor, last.reason) == ("Compensate", "alice", "customer cancelled")
    assert commands(store)[-1].command_type == "RefundPayment"


async def test_a_failed_compensation_parks_the_saga_with_a_dead_letter(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    saga = await parked_saga(orchestrator, store)

    assert saga.status is SagaStatus.FAILED
    [dead] = [
        row.envelope for row in store.outbox_rows if row.envelope.route is RouteKind.DEAD_LETTER
    ]
    assert dead.message_type == "ReleaseInventory"
    assert decode_command(dead).payload == {"order_id": "o-1", "reservation_id": "r-1"}


async def test_an_operator_retries_a_failed_compensation_with_a_new_attempt(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await parked_saga(orchestrator, store)

    saga = await orchestrator.retry_compensation("saga-1", actor="bob", reason="API is back")

    assert saga.status is SagaStatus.COMPENSATING
    retry = commands(store)[-1]
    assert (retry.command_type, retry.kind, retry.attempt) == (
        "ReleaseInventory",
        StepKind.COMPENSATE,
        2,
    )
    last = (await orchestrator.history("saga-1"))[-1]
    assert (last.input, last.actor) == ("RetryCompensation", "bob")


async def test_an_operator_resolves_a_parked_saga_with_a_note(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await parked_saga(orchestrator, store)

    saga = await orchestrator.resolve("saga-1", actor="carol", note="released by hand")

    assert saga.status is SagaStatus.RESOLVED
    last = (await orchestrator.history("saga-1"))[-1]
    assert (last.input, last.actor, last.reason) == ("Resolve", "carol", "released by hand")


async def test_resolving_a_running_saga_is_an_invalid_operation(
    orchestrator: Orchestrator,
) -> None:
    await start(orchestrator)

    with pytest.raises(InvalidOperation, match="cannot resolve a running saga"):
        await orchestrator.resolve("saga-1", actor="carol", note="oops")

    assert (await orchestrator.get("saga-1")).version == 1


async def test_operator_actions_on_an_unknown_saga_raise_saga_not_found(
    orchestrator: Orchestrator,
) -> None:
    with pytest.raises(SagaNotFound):
        await orchestrator.compensate("ghost", actor="alice")


# ---------------------------------------------------------------------- status API


async def test_get_list_and_history_read_the_store(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator, "saga-1")
    clock.advance(1)
    await start(orchestrator, "saga-2")
    clock.advance(1)
    await orchestrator.handle_reply(answer(commands(store)[0], data={"reservation_id": "r-1"}))
    await orchestrator.handle_reply(answer(commands(store)[-1]))

    assert (await orchestrator.get("saga-1")).status is SagaStatus.COMPLETED
    running = await orchestrator.list(status=SagaStatus.RUNNING)
    assert [saga.saga_id for saga in running] == ["saga-2"]
    assert [saga.saga_id for saga in await orchestrator.list(saga_type="order")] == [
        "saga-2",
        "saga-1",
    ]
    inputs = [entry.input for entry in await orchestrator.history("saga-1")]
    assert inputs == ["Start", "StepSucceeded", "StepSucceeded"]
    with pytest.raises(SagaNotFound):
        await orchestrator.get("ghost")


async def test_wait_for_returns_a_settled_saga(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    await orchestrator.compensate("saga-1", actor="alice")
    await orchestrator.handle_reply(answer(commands(store)[-1]))

    saga = await orchestrator.wait_for("saga-1", timeout=1)

    assert saga.status is SagaStatus.COMPENSATED


async def test_wait_for_wakes_on_a_local_commit(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    waiter = asyncio.create_task(orchestrator.wait_for("saga-1", timeout=2, poll_interval=5))
    await asyncio.sleep(0.01)

    await orchestrator.compensate("saga-1", actor="alice")
    await orchestrator.handle_reply(answer(commands(store)[-1]))

    async with asyncio.timeout(1):
        saga = await waiter
    assert saga.status is SagaStatus.COMPENSATED


async def test_wait_for_sleeps_through_commits_of_other_sagas_and_leaves_no_waiter_behind(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    await start(orchestrator)
    await start(orchestrator, saga_id="saga-2")
    waiter = asyncio.create_task(orchestrator.wait_for("saga-1", timeout=2, poll_interval=5))
    await asyncio.sleep(0.01)

    await orchestrator.compensate("saga-2", actor="alice")  # wakes the waiters of saga-2 only
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert list(orchestrator.queries._waiters) == ["saga-1"]
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not orchestrator.queries._waiters


async def test_wait_for_raises_timeout_error_when_the_saga_does_not_settle(
    orchestrator: Orchestrator,
) -> None:
    await start(orchestrator)

    with pytest.raises(TimeoutError) as timed_out:
        await orchestrator.wait_for("saga-1", timeout=0.05, poll_interval=0.01)
    assert str(timed_out.value) == (
        "saga saga-1 did not settle within 0.05s: running at step 'reserve' (attempt 1, "
        "waiting for reply); is the participant for that step running, on the same broker and "
        "prefix?"
    )


async def test_commit_listeners_see_each_commit_and_cannot_undo_it(
    orchestrator: Orchestrator, store: RecordingStore
) -> None:
    seen: list[str] = []

    def broken(instances: Sequence[SagaInstance]) -> None:
        raise RuntimeError("listener bug")

    orchestrator.add_listener(broken)
    orchestrator.add_listener(lambda instances: seen.extend(i.saga_id for i in instances))

    await start(orchestrator)

    assert seen == ["saga-1"]
    assert await store.load("saga-1") is not None


async def test_a_due_saga_under_a_changed_definition_is_parked_and_other_deadlines_fire(
    store: RecordingStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    old = Orchestrator(
        store=store, definitions=[order_saga(reserve_timeout=5, inventory="stock")], clock=clock
    )
    await start(old, "saga-old")  # due first: its reply deadline is 5 s away
    current = Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)
    await start(current, "saga-new")
    clock.advance(10)

    assert await current.fire_due() == 2

    assert (await current.get("saga-new")).wait is WaitKind.RETRY
    assert (await current.get("saga-old")).status is SagaStatus.FAILED
    assert "saga-old" in caplog.text


# ---------------------------------------------------------------------- sagas it cannot decide


def unregistered_saga(store: RecordingStore, clock: FakeClock) -> Orchestrator:
    """An orchestrator that runs the order saga but not the refund saga."""
    return Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock)


async def start_refund(orchestrator: Orchestrator) -> SagaInstance:
    return await orchestrator.start("refund", RefundData(order_id="o-9"), saga_id="refund-1")


def history_inputs(entries: Sequence[HistoryEntry]) -> list[tuple[str, str]]:
    return [(entry.input, entry.outcome) for entry in entries]


async def test_a_reply_for_a_saga_of_an_unregistered_type_parks_it_and_is_acked_once(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start_refund(orchestrator)
    reply = answer(commands(store)[0])
    worker = unregistered_saga(store, clock)

    assert await worker.handle_reply(reply) is None

    saga = await worker.get("refund-1")
    assert saga.status is SagaStatus.FAILED
    assert saga.error is not None
    assert saga.error.code == "unknown_saga_type"
    assert "registered: order" in saga.error.message
    assert saga.next_deadline_at is None
    last = (await worker.history("refund-1"))[-1]
    assert (last.input, last.to_status, last.message_id) == (
        "Park",
        SagaStatus.FAILED,
        reply.message_id,
    )
    assert last.reason is not None
    assert "no saga definition registered" in last.reason
    assert await store.is_processed(worker.consumer, reply.message_id)
    assert event_kinds(store)[-1] is EventKind.FAILED
    # A redelivery of the same reply is a duplicate: it changes nothing.
    assert await worker.handle_reply(reply) is None
    assert (await worker.get("refund-1")).version == saga.version


async def test_a_parked_saga_leaves_the_deadline_scan_and_other_sagas_keep_moving(
    store: RecordingStore, clock: FakeClock
) -> None:
    timed_refund = (
        SagaBuilder("refund", data=RefundData)
        .step("pay")
        .send(RefundPayment, to="payments")
        .timeout(seconds=3)
        .build()
    )
    before = Orchestrator(store=store, definitions=[ORDER_SAGA, timed_refund], clock=clock)
    await start_refund(before)
    await start(before)
    worker = unregistered_saga(store, clock)
    clock.advance(11)

    assert await worker.fire_due() == 2  # the refund parked, the order's attempt timed out
    clock.advance(5)
    await worker.fire_due()

    later = await store.due(clock.now() + timedelta(days=1), 10)
    assert [saga.saga_id for saga in later] == ["saga-1"]  # the parked saga is never due again
    await worker.handle_reply(answer(commands(store)[-1], data={"reservation_id": "r-1"}))
    assert (await worker.get("saga-1")).current_step == 1
    assert [saga.saga_id for saga in await worker.list(status=SagaStatus.FAILED)] == ["refund-1"]
    assert history_inputs(await worker.history("refund-1")) == [
        ("Start", "applied"),
        ("Park", "applied"),
    ]


async def test_a_finished_saga_under_a_changed_definition_stays_finished_and_records_the_reply(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start(orchestrator)
    await orchestrator.compensate("saga-1", actor="alice")
    await orchestrator.handle_reply(answer(commands(store)[-1]))
    assert (await orchestrator.get("saga-1")).status is SagaStatus.COMPENSATED
    late = answer(commands(store)[0])
    redeployed = Orchestrator(store=store, definitions=[order_saga(inventory="stock")], clock=clock)

    assert await redeployed.handle_reply(late) is None

    assert (await redeployed.get("saga-1")).status is SagaStatus.COMPENSATED
    assert (await redeployed.history("saga-1"))[-1].outcome == "stale"
    assert await store.is_processed(redeployed.consumer, late.message_id)


async def test_an_operator_resolves_a_saga_parked_for_an_unregistered_type(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start_refund(orchestrator)
    worker = unregistered_saga(store, clock)
    await worker.handle_reply(answer(commands(store)[0]))

    saga = await worker.resolve("refund-1", actor="dora", note="refunded by hand")

    assert saga.status is SagaStatus.RESOLVED
    assert saga.error is not None
    assert saga.error.code == "unknown_saga_type"
    last = (await worker.history("refund-1"))[-1]
    assert (last.input, last.actor, last.reason) == ("Resolve", "dora", "refunded by hand")
    assert event_kinds(store)[-1] is EventKind.RESOLVED


async def test_retrying_the_compensation_of_a_saga_parked_for_an_unregistered_type_raises(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start_refund(orchestrator)
    worker = unregistered_saga(store, clock)
    await worker.handle_reply(answer(commands(store)[0]))

    with pytest.raises(UnknownSagaType):
        await worker.retry_compensation("refund-1", actor="dora")


async def test_resolving_a_running_saga_of_an_unregistered_type_is_an_invalid_operation(
    orchestrator: Orchestrator, store: RecordingStore, clock: FakeClock
) -> None:
    await start_refund(orchestrator)

    with pytest.raises(InvalidOperation, match="only a failed one"):
        await unregistered_saga(store, clock).resolve("refund-1", actor="dora", note="-")


# ---------------------------------------------------------------------- status events


def _event_keys(store: InMemorySagaStore) -> list[str]:
    return [row.envelope.key for row in store.outbox_rows if row.envelope.route is RouteKind.EVENT]


async def _complete(orchestrator: Orchestrator, store: InMemorySagaStore) -> None:
    await start(orchestrator)
    await orchestrator.handle_reply(answer(commands(store)[-1]))  # reserve
    await orchestrator.handle_reply(answer(commands(store)[-1]))  # pay: completed


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            StatusEvents.ALL,
            ["order.started", "order.step_completed", "order.step_completed", "order.completed"],
        ),
        ("lifecycle", ["order.started", "order.completed"]),
        ("none", []),
    ],
)
async def test_status_events_go_to_the_topic_as_configured_while_history_keeps_everything(
    clock: FakeClock, setting: StatusEvents | str, expected: list[str]
) -> None:
    store = RecordingStore()
    orchestrator = Orchestrator(
        store=store, definitions=[ORDER_SAGA], clock=clock, status_events=setting
    )

    await _complete(orchestrator, store)

    assert _event_keys(store) == expected
    assert (await orchestrator.get("saga-1")).status is SagaStatus.COMPLETED
    assert len(await orchestrator.history("saga-1")) == 3


def test_an_unknown_status_events_setting_is_refused(
    store: RecordingStore, clock: FakeClock
) -> None:
    with pytest.raises(ValueError, match="'some'"):
        Orchestrator(store=store, definitions=[ORDER_SAGA], clock=clock, status_events="some")


def test_default_saga_ids_are_uuid4_hex() -> None:
    ids = {_uuid4_hex() for _ in range(500)}

    assert len(ids) == 500
    for saga_id in ids:
        parsed = uuid.UUID(hex=saga_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (saga_id, 4, uuid.RFC_4122)
