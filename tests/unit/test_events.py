"""Sagas started, advanced and cancelled by bus events (starts_on / wait_for / cancel_on)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    Cancel,
    CommandMessage,
    EventReceived,
    InvalidDefinition,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaInstance,
    SagaStatus,
    Start,
    StepKind,
    StepStatus,
    StepSucceeded,
)
from sagas_core import Orchestrator, SagaBuilder, StepBuilder, event_envelope
from sagas_core.codec import HEADER_REASON
from sagas_core.engine import CANCELLED_BY_EVENT_CODE, decide
from sagas_core.events import EventRoutes, event_inbox_id
from sagas_core.testing import FakeClock, InMemorySagaStore, SagaTestHarness


class ItemAdded(BaseModel):
    cart_id: str
    line_id: str
    sku: str
    quantity: int


class ItemRemoved(BaseModel):
    cart_id: str
    line_id: str


class CartCleared(BaseModel):
    cart_id: str
    line_ids: list[str]


class OrderCompleted(BaseModel):
    cart_id: str
    order_id: str
    line_ids: list[str]


class Line(BaseModel):
    cart_id: str
    line_id: str
    sku: str
    quantity: int
    order_id: str | None = None


class ReserveStock(BaseModel):
    sku: str
    quantity: int


class ReleaseStock(BaseModel):
    sku: str
    quantity: int


class CommitStock(BaseModel):
    sku: str
    quantity: int
    order_id: str


def _line_id(event: ItemAdded | ItemRemoved) -> str:
    return f"{event.cart_id}:{event.line_id}"


def _lines(event: CartCleared | OrderCompleted) -> list[str]:
    return [f"{event.cart_id}:{line}" for line in event.line_ids]


def _builder(*, order_missing: str = "dead-letter") -> StepBuilder[Line]:
    return (
        SagaBuilder("reservation", data=Line)
        .starts_on(ItemAdded, saga_id=_line_id)
        .cancel_on(ItemRemoved, saga_id=_line_id)
        .cancel_on(CartCleared, saga_id=_lines)
        .step("reserve")
        .send(ReserveStock, to="inventory")
        .compensate_with(ReleaseStock)
        .step("await-order")
        .wait_for(OrderCompleted, saga_id=_lines, missing=order_missing)
        .timeout(minutes=30)
        .step("commit")
        .send(CommitStock, to="inventory")
    )


RESERVATION = _builder().build()


def _harness(*, reserve_reply: bool = True) -> SagaTestHarness:
    harness = SagaTestHarness(RESERVATION)
    inventory = harness.stub("inventory")
    if reserve_reply:
        inventory.on(ReserveStock).succeed()
    else:
        inventory.on(ReserveStock).never_answer()
    inventory.on(ReleaseStock).succeed()
    inventory.on(CommitStock).succeed()
    return harness


def _added(line: str = "1", *, cart: str = "c1", sku: str = "A") -> ItemAdded:
    return ItemAdded(cart_id=cart, line_id=line, sku=sku, quantity=2)


# ---------------------------------------------------------------------- starting


async def test_an_event_starts_a_saga_whose_id_comes_from_the_event() -> None:
    harness = _harness()

    outcome = await harness.publish(_added(), message_id="m-1")

    assert outcome.started == ["c1:1"]
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.RUNNING
    assert saga.current_step_name == "await-order"
    assert saga.data == {
        "cart_id": "c1",
        "line_id": "1",
        "sku": "A",
        "quantity": 2,
        "order_id": None,
    }
    assert harness.commands("c1:1") == ["ReserveStock"]


async def test_a_duplicate_start_event_never_starts_a_second_saga() -> None:
    harness = _harness()
    await harness.publish(_added(), message_id="m-1")

    again = await harness.publish(_added(), message_id="m-1")
    other_message_same_line = await harness.publish(_added(), message_id="m-2")

    assert again.started == []
    assert again.ignored == ["c1:1"]
    assert other_message_same_line.started == []
    assert harness.commands() == ["ReserveStock"]  # reserved once
    assert len(await harness.store.find()) == 1


async def test_a_start_event_whose_data_does_not_fit_is_dead_lettered_naming_the_field() -> None:
    harness = _harness()

    class Partial(BaseModel):
        cart_id: str
        line_id: str
        sku: str
        quantity: str

    outcome = await harness.publish(
        Partial(cart_id="c1", line_id="1", sku="A", quantity="many"), topic="ItemAdded"
    )

    assert outcome.started == []
    assert len(outcome.dead_letter) == 1
    assert "quantity" in outcome.dead_letter[0]
    assert "reservation" in outcome.dead_letter[0]
    assert await harness.store.find() == []
    [dead] = harness.dead_letters
    assert dead.route is RouteKind.DEAD_LETTER
    assert "quantity" in dead.headers[HEADER_REASON]


async def test_a_body_that_is_not_json_is_dead_lettered_not_retried() -> None:
    harness = _harness()
    envelope = event_envelope(_added(), message_id="m-1").model_copy(update={"body": b"{oops"})

    outcome = await harness.orchestrator.handle_event(envelope)

    assert outcome.dead_letter
    assert "ItemAdded" in outcome.dead_letter[0]
    assert await harness.store.find() == []


async def test_a_saga_id_function_that_raises_dead_letters_the_event() -> None:
    def broken(_: ItemAdded) -> str:
        raise KeyError("no id")

    saga = (
        SagaBuilder("broken", data=Line)
        .starts_on(ItemAdded, saga_id=broken)
        .step("reserve")
        .send(ReserveStock, to="inventory")
        .build()
    )
    harness = SagaTestHarness(saga)

    outcome = await harness.publish(_added())

    assert outcome.dead_letter
    assert "could not be derived" in outcome.dead_letter[0]


async def test_an_event_on_a_topic_nobody_listens_to_does_nothing() -> None:
    harness = _harness()

    outcome = await harness.publish(_added(), topic="SomethingElse")

    assert (outcome.started, outcome.dead_letter) == ([], [])
    assert await harness.store.find() == []


# ---------------------------------------------------------------------- waiting


async def test_the_awaited_event_completes_the_wait_step_and_merges_its_fields() -> None:
    harness = _harness()
    await harness.publish(_added("1"))
    await harness.publish(_added("2", sku="B"))

    outcome = await harness.publish(
        OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1", "2"])
    )

    assert outcome.applied == ["c1:1", "c1:2"]
    for saga_id in ("c1:1", "c1:2"):
        saga = await harness.saga(saga_id)
        assert saga.status is SagaStatus.COMPLETED
        assert saga.data["order_id"] == "o-1"
    commits = [c for c in harness.sent if c.command_type == "CommitStock"]
    assert sorted(c.payload["sku"] for c in commits) == ["A", "B"]


async def test_an_event_that_arrives_before_its_step_is_kept_and_applied_when_the_step_begins() -> (
    None
):
    harness = _harness(reserve_reply=False)
    await harness.publish(_added())
    assert (await harness.saga("c1:1")).current_step_name == "reserve"

    early = await harness.publish(OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1"]))

    assert early.kept == ["c1:1"]
    assert early.applied == []
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.RUNNING
    assert saga.steps[1].early_event is not None
    assert saga.steps[1].status is StepStatus.PENDING

    # The reserve reply arrives late: the saga moves through the wait step at once.
    [reserve] = [c for c in harness.sent if c.command_type == "ReserveStock"]
    harness.stub("inventory").on(ReserveStock).succeed()
    decision = await harness.orchestrator.handle_reply(_reply_to(reserve, harness))
    assert decision is not None
    await harness.run_until_idle()
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.COMPLETED
    assert saga.data["order_id"] == "o-1"
    assert saga.steps[1].early_event is None


async def test_a_wait_step_that_times_out_compensates_the_saga() -> None:
    harness = _harness()
    await harness.publish(_added())

    await harness.advance(timedelta(minutes=31))

    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.COMPENSATED
    assert harness.commands("c1:1") == ["ReserveStock", "ReleaseStock"]
    assert saga.steps[1].error is not None
    assert saga.steps[1].error.code == "timeout"


async def test_the_awaited_event_for_a_missing_saga_follows_the_dead_letter_policy() -> None:
    harness = _harness()

    outcome = await harness.publish(OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["7"]))

    assert outcome.dead_letter
    assert "c1:7" in outcome.dead_letter[0]
    assert len(harness.dead_letters) == 1


async def test_the_ignore_policy_drops_an_event_for_a_missing_saga_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sagas.orchestrator")
    harness = SagaTestHarness(_builder(order_missing="ignore").build())

    outcome = await harness.publish(OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["7"]))

    assert outcome.ignored == ["c1:7"]
    assert outcome.dead_letter == []
    assert harness.dead_letters == []
    assert any("does not exist" in record.getMessage() for record in caplog.records)


async def test_the_start_policy_starts_the_saga_and_applies_the_event_to_it() -> None:
    class Paid(BaseModel):
        order_id: str
        amount: int

    class Order(BaseModel):
        order_id: str
        amount: int | None = None

    class Placed(BaseModel):
        order_id: str

    class Ship(BaseModel):
        order_id: str

    saga = (
        SagaBuilder("paid-first", data=Order)
        .starts_on(Placed, saga_id="order_id")
        .step("await-payment")
        .wait_for(Paid, saga_id="order_id", missing="start")
        .step("ship")
        .send(Ship, to="shipping")
        .build()
    )
    harness = SagaTestHarness(saga)
    harness.stub("shipping").on(Ship).succeed()

    outcome = await harness.publish(Paid(order_id="o-1", amount=5))
    late_start = await harness.publish(Placed(order_id="o-1"))

    assert outcome.started == ["o-1"]
    assert late_start.started == []
    saga_now = await harness.saga("o-1")
    assert saga_now.status is SagaStatus.COMPLETED
    assert saga_now.data == {"order_id": "o-1", "amount": 5}


async def test_the_same_event_delivered_twice_is_applied_once() -> None:
    harness = _harness(reserve_reply=False)
    await harness.publish(_added())
    event = OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1"])

    first = await harness.publish(event, message_id="e-1")
    second = await harness.publish(event, message_id="e-1")

    assert first.kept == ["c1:1"]
    assert second.kept == []
    assert second.applied == []
    assert second.ignored == ["c1:1"]
    assert (await harness.saga("c1:1")).version == 2  # started (reserve sent), event kept


# ---------------------------------------------------------------------- cancelling


async def test_a_cancelling_event_compensates_a_running_saga() -> None:
    harness = _harness()
    await harness.publish(_added())

    outcome = await harness.publish(ItemRemoved(cart_id="c1", line_id="1"))

    assert outcome.applied == ["c1:1"]
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.COMPENSATED
    assert saga.error is not None
    assert saga.error.code == CANCELLED_BY_EVENT_CODE
    assert "ItemRemoved" in saga.error.message
    assert harness.commands("c1:1", kind=StepKind.COMPENSATE) == ["ReleaseStock"]
    history = await harness.store.history("c1:1")
    assert any(entry.actor == "event:ItemRemoved" for entry in history)


async def test_one_event_can_cancel_several_sagas() -> None:
    harness = _harness()
    for line in ("1", "2", "3"):
        await harness.publish(_added(line))

    outcome = await harness.publish(CartCleared(cart_id="c1", line_ids=["1", "2", "3"]))

    assert outcome.applied == ["c1:1", "c1:2", "c1:3"]
    for line in ("1", "2", "3"):
        assert (await harness.saga(f"c1:{line}")).status is SagaStatus.COMPENSATED


async def test_a_cancelling_event_after_the_saga_completed_changes_nothing() -> None:
    harness = _harness()
    await harness.publish(_added())
    await harness.publish(OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1"]))

    outcome = await harness.publish(ItemRemoved(cart_id="c1", line_id="1"))

    assert outcome.ignored == ["c1:1"]
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.COMPLETED
    assert harness.commands("c1:1", kind=StepKind.COMPENSATE) == []


async def test_a_cancelling_event_for_a_missing_saga_is_ignored_by_default() -> None:
    harness = _harness()

    outcome = await harness.publish(ItemRemoved(cart_id="c1", line_id="9"))

    assert outcome.ignored == ["c1:9"]
    assert outcome.dead_letter == []


# ---------------------------------------------------------------------- engine, directly


def test_the_engine_ignores_an_event_for_a_step_that_does_not_wait_for_one() -> None:
    started = _started()
    decision = decide(
        RESERVATION,
        started,
        EventReceived(step="reserve", event="OrderCompleted", at=started.updated_at),
    )
    assert not decision.changed
    assert decision.history[0].reason == "step 'reserve' does not wait for an event"


def test_the_engine_ignores_a_cancel_of_a_saga_that_is_already_compensating() -> None:
    started = _started()
    cancelled = decide(RESERVATION, started, Cancel(event="ItemRemoved", at=started.updated_at))
    assert cancelled.instance.status is SagaStatus.COMPENSATING

    again = decide(
        RESERVATION, cancelled.instance, Cancel(event="CartCleared", at=started.updated_at)
    )

    assert not again.changed
    assert again.history[0].reason == "saga is compensating"


def test_the_engine_keeps_only_the_first_early_event_for_a_step() -> None:
    started = _started()
    first = decide(
        RESERVATION,
        started,
        EventReceived(
            step="await-order",
            event="OrderCompleted",
            at=started.updated_at,
            data={"order_id": "a"},
        ),
    )
    second = decide(
        RESERVATION,
        first.instance,
        EventReceived(
            step="await-order",
            event="OrderCompleted",
            at=started.updated_at,
            data={"order_id": "b"},
        ),
    )
    assert first.instance.steps[1].early_event == {"order_id": "a"}
    assert not second.changed


def _started() -> SagaInstance:
    decision = decide(
        RESERVATION,
        None,
        Start(
            saga_id="c1:1",
            data=_added().model_dump(),
            at=FakeClock().now(),
        ),
    )
    return decision.instance


# ---------------------------------------------------------------------- definitions


def test_triggers_are_indexed_by_topic() -> None:
    routes = EventRoutes([RESERVATION])
    assert routes.topics == ("ItemAdded", "ItemRemoved", "CartCleared", "OrderCompleted")
    [(definition, trigger)] = routes.get("OrderCompleted")
    assert definition is RESERVATION
    assert trigger.step == "await-order"


def test_triggers_are_not_part_of_the_fingerprint() -> None:
    without_cancel = (
        SagaBuilder("reservation", data=Line)
        .starts_on(ItemAdded, saga_id=_line_id)
        .step("reserve")
        .send(ReserveStock, to="inventory")
        .compensate_with(ReleaseStock)
        .step("await-order")
        .wait_for(OrderCompleted, saga_id=_lines, missing="dead-letter")
        .timeout(minutes=30)
        .step("commit")
        .send(CommitStock, to="inventory")
        .build()
    )
    assert without_cancel.fingerprint == RESERVATION.fingerprint


def test_a_long_inbox_key_is_hashed_to_fit_the_column() -> None:
    assert event_inbox_id("m", "s") == "m@s"
    long = event_inbox_id("m" * 300, "s" * 200)
    assert long.startswith("sha256:")
    assert len(long) <= 400


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda b: b.starts_on(ItemAdded, saga_id="nope"),
            "saga_id names 'nope', which is not a field of ItemAdded",
        ),
        (
            lambda b: b.starts_on(ItemRemoved, saga_id="line_id"),
            "Line.sku is required but ItemRemoved has no field 'sku'",
        ),
        (
            lambda b: b.cancel_on(ItemRemoved, saga_id="line_id", missing="start"),
            "cancel_on(ItemRemoved) cannot start a saga",
        ),
        (
            lambda b: b.cancel_on(ItemRemoved, saga_id="line_id", missing="sometimes"),
            "must be one of 'ignore', 'dead-letter', 'start', got 'sometimes'",
        ),
        (
            lambda b: b.starts_on(ItemAdded, saga_id="line_id", topic="cart.*"),
            "no wildcards",
        ),
        (
            lambda b: b.starts_on(ItemAdded, saga_id="line_id").cancel_on(
                ItemAdded, saga_id="line_id"
            ),
            "event topic 'ItemAdded' is already used by this saga",
        ),
        (
            lambda b: b.starts_on(ItemAdded, saga_id="line_id", data={"sku": "missing"}),
            "data reads 'missing', which is not a field of ItemAdded",
        ),
    ],
)
def test_bad_event_declarations_fail_the_build_naming_saga_and_field(
    build: object, fragment: str
) -> None:
    builder = SagaBuilder("reservation", data=Line)
    builder.step("reserve").send(ReserveStock, to="inventory")
    build(builder)  # type: ignore[operator]
    with pytest.raises(InvalidDefinition) as caught:
        builder.build()
    assert fragment in str(caught.value)
    assert caught.value.saga_type == "reservation"


def test_a_wait_step_cannot_be_retried_or_compensated() -> None:
    builder = SagaBuilder("reservation", data=Line)
    (
        builder.step("await")
        .wait_for(OrderCompleted, saga_id="order_id")
        .retry(3)
        .compensate_with(ReleaseStock, to="inventory")
    )
    with pytest.raises(InvalidDefinition) as caught:
        builder.build()
    problems = [str(p) for p in caught.value.problems]
    assert any("cannot be retried" in p for p in problems)
    assert any("nothing to compensate" in p for p in problems)


def test_data_for_a_non_starting_event_is_reported_as_unused() -> None:
    builder = SagaBuilder("reservation", data=Line)
    builder.step("await").wait_for(
        OrderCompleted, saga_id="order_id", missing="ignore", data={"sku": "order_id"}
    )
    with pytest.raises(InvalidDefinition, match="only used to start a saga"):
        builder.build()


def _reply_to(command: CommandMessage, harness: SagaTestHarness) -> ReplyMessage:
    return ReplyMessage.answering(command, status=ReplyStatus.SUCCEEDED, at=harness.clock.now())


def test_step_status_events_name_the_attempt_they_concern() -> None:
    started = _started()
    event = StepSucceeded(
        step="reserve", attempt=started.attempt, kind=StepKind.EXECUTE, at=started.updated_at
    )

    decision = decide(RESERVATION, started, event)

    [completed] = [e for e in decision.events if e.step == "reserve"]
    assert completed.kind.value == "step_completed"
    assert completed.attempt == 1


async def test_the_harness_can_publish_a_raw_body_as_a_buggy_publisher_would() -> None:
    harness = _harness()

    outcome = await harness.publish(_added(), body=b'{"cart_id": "c1", "line_id": 7}')

    assert outcome.started == []
    [reason] = outcome.dead_letter
    assert "line_id" in reason
    assert "sku" in reason


async def test_a_saga_started_by_an_event_records_the_event_and_its_message_in_history() -> None:
    harness = _harness()

    await harness.publish(_added(), message_id="cart-msg-1")

    start = (await harness.store.history("c1:1"))[0]
    assert start.input == "Start"
    assert (start.actor, start.message_id) == ("event:ItemAdded", "cart-msg-1")


async def test_an_awaited_event_a_finished_saga_cannot_use_follows_the_missing_policy() -> None:
    harness = _harness()  # OrderCompleted: missing="dead-letter"
    await harness.publish(_added())
    await harness.advance(timedelta(minutes=31))  # the reservation expired and was released

    event = OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1"])
    late = await harness.publish(event, message_id="late-1")
    again = await harness.publish(event, message_id="late-1")

    [reason] = late.dead_letter
    assert "could not use it (saga is compensated)" in reason
    assert again.dead_letter == []  # the same message again: a duplicate, recorded once
    assert len(harness.dead_letters) == 1
    saga = await harness.saga("c1:1")
    assert saga.status is SagaStatus.COMPENSATED
    assert saga.steps[1].error is not None
    assert saga.steps[1].error.message == "OrderCompleted did not arrive within 1800s"


async def test_a_late_cancel_is_logged_and_ignored_under_the_ignore_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sagas.orchestrator")
    harness = _harness()
    await harness.publish(_added())
    await harness.publish(OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1"]))

    outcome = await harness.publish(ItemRemoved(cart_id="c1", line_id="1"))

    assert outcome.ignored == ["c1:1"]
    assert outcome.dead_letter == []
    assert any("could not use it (saga is completed)" in r.getMessage() for r in caplog.records)


async def test_a_start_data_function_that_raises_dead_letters_the_event() -> None:
    def broken(_: ItemAdded) -> Line:
        raise RuntimeError("no price list")

    saga = (
        SagaBuilder("broken-data", data=Line)
        .starts_on(ItemAdded, saga_id=_line_id, data=broken)
        .step("reserve")
        .send(ReserveStock, to="inventory")
        .build()
    )
    harness = SagaTestHarness(saga)

    outcome = await harness.publish(_added())

    [reason] = outcome.dead_letter
    assert "RuntimeError: no price list" in reason
    assert await harness.store.find() == []


async def test_a_start_event_naming_a_saga_of_another_type_is_dead_lettered() -> None:
    harness = _harness()
    other = SagaBuilder("other", data=Line).step("s").send(ReserveStock, to="inventory").build()
    harness.orchestrator.registry.register(other)
    harness.stub("inventory").on(ReserveStock).never_answer()
    await harness.orchestrator.start(other, _added().model_dump(), saga_id="c1:1")

    outcome = await harness.publish(_added())

    [reason] = outcome.dead_letter
    assert "a 'other' saga already has this id" in reason
    assert (await harness.saga("c1:1")).saga_type == "other"


async def test_an_event_for_a_saga_started_under_another_definition_parks_it() -> None:
    store, clock = InMemorySagaStore(), FakeClock()
    old = Orchestrator(store=store, definitions=[RESERVATION], clock=clock)
    await old.start(RESERVATION, _added().model_dump(), saga_id="c1:1")
    moved = (  # the same saga, its reservations sent elsewhere: another fingerprint
        SagaBuilder("reservation", data=Line)
        .cancel_on(ItemRemoved, saga_id=_line_id)
        .step("reserve")
        .send(ReserveStock, to="stock")
        .compensate_with(ReleaseStock)
        .step("await-order")
        .wait_for(OrderCompleted, saga_id=_lines)
        .step("commit")
        .send(CommitStock, to="stock")
        .build()
    )
    new = Orchestrator(store=store, definitions=[moved], clock=clock)

    outcome = await new.handle_event(
        event_envelope(ItemRemoved(cart_id="c1", line_id="1"), message_id="r-1")
    )

    assert outcome.ignored == ["c1:1"]
    saga = await new.get("c1:1")
    assert saga.status is SagaStatus.FAILED
    assert saga.error is not None
    assert saga.error.code == "definition_changed"
