"""The orchestrator's collaborators on their own: event routing, parking, queries, changes.

Each gets what it needs explicitly (the unit of work, the clock, the operations it asks of the
orchestrator), so each is tested here with stand-ins for the rest; the orchestrator-level tests
(test_orchestrator, test_events) cover them wired together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from sagas_abstractions import (
    EventKind,
    EventReceived,
    InboxEntry,
    SagaInput,
    SagaInstance,
    SagaStatus,
    Start,
    UnknownSagaType,
)
from sagas_core import SagaBuilder, event_envelope
from sagas_core.changes import ChangeBuilder, StatusEvents
from sagas_core.definition import SagaDefinition
from sagas_core.engine import Decision, decide
from sagas_core.event_routing import EventRouter
from sagas_core.parking import Parking, Undecidable
from sagas_core.queries import SagaQueries
from sagas_core.registry import SagaRegistry
from sagas_core.telemetry import Telemetry
from sagas_core.testing import FakeClock, InMemorySagaStore
from sagas_core.unit_of_work import SagaUnitOfWork


class Paid(BaseModel):
    order_id: str


class Order(BaseModel):
    order_id: str


class Ship(BaseModel):
    order_id: str


ORDER: SagaDefinition = (
    SagaBuilder("order", data=Order)
    .step("pay")
    .wait_for(Paid, saga_id=lambda event: event.order_id, missing="start")
    .step("ship")
    .send(Ship, to="shipping")
    .build()
)


def started(clock: FakeClock, saga_id: str = "o-1") -> Decision:
    return decide(ORDER, None, Start(saga_id=saga_id, data={"order_id": saga_id}, at=clock.now()))


class Operations:
    """Stand-ins for the orchestrator's operations, recording how the router calls them."""

    def __init__(self, *, missing: bool = False, undecidable: Undecidable | None = None) -> None:
        self.missing = missing
        self.undecidable = undecidable
        self.calls: list[str] = []
        self.parked: list[tuple[str, InboxEntry | None]] = []

    async def apply(
        self,
        saga_id: str,
        make: Callable[[SagaInstance], SagaInput | None],
        *,
        inbox: InboxEntry | None,
        saga_type: str | None = None,
    ) -> Decision | None:
        self.calls.append(f"apply {saga_id} {saga_type}")
        if self.undecidable is not None:
            raise self.undecidable
        clock = FakeClock()
        decision = started(clock, saga_id)
        event = make(decision.instance)
        assert event is not None
        return decide(ORDER, decision.instance, event)

    async def start(
        self,
        saga: SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None,
        correlation_id: str | None,
        trace_context: Mapping[str, str] | None,
        cause: tuple[str, str] | None = None,
    ) -> tuple[SagaInstance, bool]:
        self.calls.append(f"start {saga_id} {cause}")
        return started(FakeClock(), saga_id or "").instance, True

    async def park(
        self,
        saga_id: str,
        problem: Undecidable,
        *,
        inbox: InboxEntry | None,
        message_id: str | None = None,
    ) -> int:
        self.parked.append((saga_id, inbox))
        return 1


def changes(status_events: StatusEvents = StatusEvents.ALL) -> ChangeBuilder:
    return ChangeBuilder(reply_to="r", status_events=status_events, telemetry=Telemetry.default())


def router(operations: Operations) -> EventRouter:
    return EventRouter(
        SagaRegistry([ORDER]),
        clock=FakeClock(),
        telemetry=Telemetry.default(),
        consumer="orchestrator.test",
        apply=operations.apply,
        start=operations.start,
        park=operations.park,
    )


# ---------------------------------------------------------------------- event routing


async def test_the_router_applies_an_awaited_event_through_the_operation_it_was_given() -> None:
    operations = Operations()

    outcome = await router(operations).route(
        event_envelope(Paid(order_id="o-1"), message_id="m-1"), system="test"
    )

    assert outcome.applied == ["o-1"]
    assert operations.calls == ["apply o-1 order"]


async def test_the_router_parks_a_saga_the_apply_operation_cannot_decide() -> None:
    operations = Operations(undecidable=UnknownSagaType("gone", saga_type="order"))

    outcome = await router(operations).route(
        event_envelope(Paid(order_id="o-1"), message_id="m-1"), system="test"
    )

    assert outcome.ignored == ["o-1"]
    [(saga_id, inbox)] = operations.parked
    assert saga_id == "o-1"
    assert inbox is not None
    assert inbox.consumer == "orchestrator.test"


def test_the_router_indexes_a_definition_registered_after_it_was_made() -> None:
    registry = SagaRegistry()
    events = EventRouter(
        registry,
        clock=FakeClock(),
        telemetry=Telemetry.default(),
        consumer="c",
        apply=Operations().apply,
        start=Operations().start,
        park=Operations().park,
    )
    assert events.topics == ()

    registry.register(ORDER)

    assert len(events.topics) == 1


# ---------------------------------------------------------------------- queries


async def test_queries_wake_the_waiters_of_a_settled_saga_only() -> None:
    store, clock = InMemorySagaStore(), FakeClock()
    decision = started(clock)
    await store.save([changes().change(decision, expected_version=None, inbox=None)])
    queries = SagaQueries(store)
    waiting = asyncio.create_task(queries.wait_for("o-1", timeout=2, poll_interval=5))
    await asyncio.sleep(0.01)

    queries.committed([decision.instance])  # still running: the waiter sleeps on
    await asyncio.sleep(0.01)
    assert not waiting.done()

    version = decision.instance.version
    finished = decision.instance.model_copy(
        update={"status": SagaStatus.COMPLETED, "version": version + 1}
    )
    settled = Decision(instance=finished, changed=True)
    await store.save([changes().change(settled, expected_version=version, inbox=None)])
    queries.committed([finished])

    assert (await asyncio.wait_for(waiting, 1)).status is SagaStatus.COMPLETED
    assert not queries._waiters


# ---------------------------------------------------------------------- changes


def test_lifecycle_status_events_leave_out_each_steps_events() -> None:
    clock = FakeClock()
    begun = started(clock).instance
    [trigger] = ORDER.triggers
    paid = EventReceived(
        step="pay", event=trigger.name, at=clock.now(), message_id="m-1", data={"order_id": "o-1"}
    )
    decision = decide(ORDER, begun, paid)  # the wait step completes, shipping is sent
    every, lifecycle = changes(StatusEvents.ALL), changes(StatusEvents.LIFECYCLE)
    silent = changes(StatusEvents.NONE)

    assert [event.kind for event in decision.events] == [EventKind.STEP_COMPLETED]
    assert len(every.envelopes(decision)) == 2
    assert lifecycle.envelopes(decision) == silent.envelopes(decision)
    assert [envelope.key for envelope in silent.envelopes(decision)] == ["shipping"]
    change = every.change(decision, expected_version=1, inbox=None, status_only=True)
    assert change.status_only
    assert change.history == decision.history


# ---------------------------------------------------------------------- parking


async def test_parking_parks_a_saga_through_the_unit_of_work_and_tells_its_listeners() -> None:
    store, clock = InMemorySagaStore(), FakeClock()
    telemetry, builder = Telemetry.default(), changes()
    await store.save([builder.change(started(clock), expected_version=None, inbox=None)])
    uow = SagaUnitOfWork(store, clock=clock)
    committed: list[SagaStatus] = []
    uow.add_listener(lambda instances: committed.extend(i.status for i in instances))
    observed: list[Decision] = []
    parking = Parking(uow, builder, clock=clock, telemetry=telemetry, observe=observed.append)

    parked = await parking.park(
        "o-1", UnknownSagaType("gone", saga_type="order"), inbox=InboxEntry("c", "m-1")
    )

    assert parked == 1
    assert committed == [SagaStatus.FAILED]
    assert await store.is_processed("c", "m-1")
    assert await parking.park("o-1", UnknownSagaType("gone"), inbox=None) == 0  # parked already
    assert observed == []  # parks are counted, not observed as operator decisions
