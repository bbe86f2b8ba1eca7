"""End to end in one process: SagaRuntime over the in-memory store and bus, real time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    Envelope,
    ParticipantError,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaStatus,
    StepKind,
)
from sagas_core import (
    CommandContext,
    Dependencies,
    OrphanReplyPolicy,
    Participant,
    SagaBuilder,
    SagaHost,
    SagaRuntime,
    SagasSettings,
    fixed,
)
from sagas_core import runtime as runtime_module
from sagas_core.builder import local_destination
from sagas_core.codec import HEADER_KIND, HEADER_REASON, decode_command, encode_reply
from sagas_core.definition import SagaDefinition
from sagas_core.participant import InMemoryIdempotencyStore
from sagas_core.runtime import tune_gc
from sagas_core.testing import InMemoryBus, InMemorySagaStore
from sagas_core.worker import run_worker
from tests.waiting import eventually

WAIT = 5.0


class OrderData(BaseModel):
    order_id: str
    sku: str
    qty: int
    reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None
    total: str | None = None


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
    payment_id: str | None = None


class CreateShipment(BaseModel):
    order_id: str


def order_saga() -> SagaDefinition:
    return (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory)
        .step("pay")
        .send(ProcessPayment, to="payments")
        .compensate_with(RefundPayment)
        .step("ship")
        .send(CreateShipment, to="shipping")
        .build()
    )


class Services:
    """Participants whose handlers count their side effects."""

    def __init__(self, *, shipping_fails: bool = False) -> None:
        self.effects: Counter[str] = Counter()
        self.inventory = Participant("inventory")
        self.payments = Participant("payments")
        self.shipping = Participant("shipping")

        @self.inventory.handles(ReserveInventory)
        async def reserve(cmd: ReserveInventory) -> dict[str, str]:
            self.effects[f"reserve:{cmd.order_id}"] += 1
            return {"reservation_id": f"r-{cmd.order_id}"}

        @self.inventory.handles(ReleaseInventory)
        async def release(cmd: ReleaseInventory) -> None:
            self.effects[f"release:{cmd.reservation_id}"] += 1

        @self.payments.handles(ProcessPayment)
        async def pay(cmd: ProcessPayment) -> dict[str, str]:
            self.effects[f"pay:{cmd.order_id}"] += 1
            return {"payment_id": f"p-{cmd.order_id}"}

        @self.payments.handles(RefundPayment)
        async def refund(cmd: RefundPayment) -> None:
            self.effects[f"refund:{cmd.payment_id}"] += 1

        @self.shipping.handles(CreateShipment)
        async def ship(cmd: CreateShipment) -> dict[str, str]:
            if shipping_fails:
                raise ParticipantError("address unknown", code="bad_address")
            self.effects[f"ship:{cmd.order_id}"] += 1
            return {"shipment_id": f"s-{cmd.order_id}"}

    @property
    def all(self) -> list[Participant]:
        return [self.inventory, self.payments, self.shipping]


def data(order_id: str = "o-1") -> OrderData:
    return OrderData(order_id=order_id, sku="A-1", qty=2)


def commands_sent(bus: InMemoryBus, kind: StepKind | None = None) -> list[str]:
    return [
        envelope.message_type
        for envelope in bus.published
        if envelope.route is RouteKind.COMMAND
        and (kind is None or envelope.headers[HEADER_KIND] == kind.value)
    ]


@asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[SagaRuntime]:
    runtime = SagaRuntime(relay_poll_interval=0.05, timeout_interval=0.02, **kwargs)
    async with asyncio.timeout(WAIT * 2):
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop(grace=WAIT)


# ---------------------------------------------------------------------- outcomes


async def test_a_saga_whose_steps_all_succeed_completes_with_every_reply_merged() -> None:
    services = Services()
    bus = InMemoryBus()
    async with running(sagas=[order_saga()], participants=services.all, bus=bus) as runtime:
        saga = await runtime.start_saga("order", data(), saga_id="saga-1")

        done = await runtime.wait_for(saga.saga_id, timeout=WAIT)

    assert done.status is SagaStatus.COMPLETED
    assert done.data == {
        **data().model_dump(),
        "reservation_id": "r-o-1",
        "payment_id": "p-o-1",
        "shipment_id": "s-o-1",
    }
    assert commands_sent(bus) == ["ReserveInventory", "ProcessPayment", "CreateShipment"]
    assert [e.key for e in bus.published if e.route is RouteKind.EVENT][-1] == "order.completed"


async def test_a_failing_step_compensates_the_completed_steps_in_reverse_order() -> None:
    services = Services(shipping_fails=True)
    bus = InMemoryBus()
    async with running(sagas=[order_saga()], participants=services.all, bus=bus) as runtime:
        saga = await runtime.start_saga("order", data(), saga_id="saga-1")

        done = await runtime.wait_for(saga.saga_id, timeout=WAIT)

    assert done.status is SagaStatus.COMPENSATED
    assert done.error is not None
    assert done.error.code == "bad_address"
    assert commands_sent(bus, StepKind.COMPENSATE) == ["RefundPayment", "ReleaseInventory"]
    assert services.effects == Counter(
        {"reserve:o-1": 1, "pay:o-1": 1, "refund:p-o-1": 1, "release:r-o-1": 1}
    )


class PricingService:
    def price(self, qty: int) -> Decimal:
        return Decimal("9.95") * qty


async def test_local_steps_run_with_injected_dependencies_and_their_return_is_merged() -> None:
    undone: list[str] = []

    async def compute_total(order: OrderData, pricing: PricingService) -> dict[str, str]:
        return {"total": str(pricing.price(order.qty)), "not_a_field": "dropped"}

    async def forget_total(order: OrderData, context: CommandContext) -> None:
        undone.append(f"{context.step}:{order.total}")

    async def refuse(order: OrderData) -> None:
        raise ParticipantError(f"order {order.order_id} total {order.total} too high")

    saga = (
        SagaBuilder("priced-order", data=OrderData)
        .step("price")
        .run(compute_total)
        .compensate_with(forget_total)
        .step("approve")
        .run(refuse)
        .build()
    )
    dependencies = Dependencies().provide(PricingService, PricingService())
    async with running(sagas=[saga], dependencies=dependencies) as runtime:
        started = await runtime.start_saga(saga, data(), saga_id="saga-1")

        done = await runtime.wait_for(started.saga_id, timeout=WAIT)

    assert done.data["total"] == "19.90"
    assert "not_a_field" not in done.data
    assert done.status is SagaStatus.COMPENSATED
    assert done.error is not None
    assert done.error.message == "order o-1 total 19.90 too high"
    assert undone == ["price:19.90"]


async def test_a_participant_slower_than_the_step_timeout_is_retried_then_compensated() -> None:
    gate = asyncio.Event()
    order: list[str] = []
    inventory = Participant("inventory")

    @inventory.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, context: CommandContext) -> dict[str, str]:
        order.append(f"reserve attempt {context.attempt}")
        async with asyncio.timeout(WAIT):
            await gate.wait()
        return {"reservation_id": "r-1"}

    @inventory.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory) -> None:
        order.append("release")

    saga = (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory, timeout=WAIT)
        .timeout(seconds=0.05)
        .retry(attempts=2, backoff=fixed(0.02))
        .step("pay")
        .send(ProcessPayment, to="payments")
        .build()
    )
    bus = InMemoryBus()
    async with running(sagas=[saga], participants=[inventory], bus=bus) as runtime:
        started = await runtime.start_saga(saga, data(), saga_id="saga-1")
        saga_id = started.saga_id

        async def compensating() -> bool:
            saga = await runtime.orchestrator.get(saga_id)
            return saga.status is SagaStatus.COMPENSATING

        await eventually(compensating)
        gate.set()
        done = await runtime.wait_for(saga_id, timeout=WAIT)
        history = await runtime.orchestrator.history(saga_id)

    assert done.status is SagaStatus.COMPENSATED
    attempts = [
        decode_command(e).attempt
        for e in bus.published
        if e.route is RouteKind.COMMAND and e.message_type == "ReserveInventory"
    ]
    assert attempts == [1, 2]
    assert [entry.input for entry in history].count("Timeout") == 2
    # The release waited for the execution in flight, and the retry reused its outcome.
    assert order == ["reserve attempt 1", "release"]
    assert done.steps[0].status.value == "compensated"


async def test_a_worker_remembers_a_bounded_number_of_local_step_outcomes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The local step's outcome cache once kept 100,000 outcomes: a worker grew by about 0.5 KB
    # per saga until then. Duplicates (every command delivered twice here) are still answered
    # from it while the step is in flight.
    monkeypatch.setattr(runtime_module, "LOCAL_STEP_OUTCOMES", 3)
    runs: Counter[str] = Counter()

    async def price(order: OrderData) -> dict[str, str]:
        runs[order.order_id] += 1
        return {"total": str(Decimal("9.95") * order.qty)}

    saga = SagaBuilder("priced", data=OrderData).step("price").run(price).build()
    bus = InMemoryBus(duplicate_deliveries=True)
    async with running(sagas=[saga], bus=bus) as runtime:
        started = [
            await runtime.start_saga(saga, data(f"o-{n}"), saga_id=f"saga-{n}") for n in range(8)
        ]
        finished = [await runtime.wait_for(s.saga_id, timeout=WAIT) for s in started]
        await bus.wait_idle(timeout=WAIT)
        [local] = [p for p in runtime.participants if p.destination == local_destination("priced")]
        kept = local.idempotency

    assert {s.status for s in finished} == {SagaStatus.COMPLETED}
    assert runs == Counter({f"o-{n}": 1 for n in range(8)})
    assert isinstance(kept, InMemoryIdempotencyStore)
    assert len(kept) == 3


# ---------------------------------------------------------------------- delivery faults


async def test_duplicate_deliveries_still_apply_every_effect_exactly_once() -> None:
    services = Services()
    bus = InMemoryBus(duplicate_deliveries=True)
    store = InMemorySagaStore()
    async with running(
        sagas=[order_saga()], participants=services.all, bus=bus, store=store
    ) as runtime:
        started = [
            await runtime.start_saga("order", data(f"o-{n}"), saga_id=f"saga-{n}") for n in range(5)
        ]
        finished = [await runtime.wait_for(saga.saga_id, timeout=WAIT) for saga in started]
        await bus.wait_idle(timeout=WAIT)

    assert {saga.status for saga in finished} == {SagaStatus.COMPLETED}
    assert [saga.data["shipment_id"] for saga in finished] == [f"s-o-{n}" for n in range(5)]
    assert set(services.effects.values()) == {1}
    assert len(services.effects) == 15
    for saga in finished:
        history = await store.history(saga.saga_id)
        applied = [entry for entry in history if entry.outcome == "applied"]
        assert [entry.input for entry in applied] == ["Start"] + ["StepSucceeded"] * 3


async def test_failed_publishes_are_retried_by_the_relay_and_the_saga_completes() -> None:
    services = Services()
    bus = InMemoryBus()
    async with running(sagas=[order_saga()], participants=services.all, bus=bus) as runtime:
        bus.fail_next_publishes(3)
        saga = await runtime.start_saga("order", data(), saga_id="saga-1")

        done = await runtime.wait_for(saga.saga_id, timeout=WAIT)

    assert done.status is SagaStatus.COMPLETED
    assert runtime.relay.failures >= 1
    assert services.effects["reserve:o-1"] == 1
    assert await runtime.store.pending_count() == 0


async def test_stop_flushes_the_outbox() -> None:
    bus = InMemoryBus()
    runtime = SagaRuntime(sagas=[order_saga()], bus=bus, relay_poll_interval=WAIT)
    async with asyncio.timeout(WAIT * 2):
        await runtime.start()
        bus.fail_next_publishes(2)  # the first round fails: the command waits in the outbox
        await runtime.start_saga("order", data(), saga_id="saga-1")
        await asyncio.sleep(0.01)

        await runtime.stop(grace=WAIT)

    assert await runtime.store.pending_count() == 0
    assert commands_sent(bus) == ["ReserveInventory"]
    assert not runtime.running


async def test_a_reply_for_an_unknown_saga_is_dead_lettered_under_that_policy() -> None:
    bus = InMemoryBus()
    orphan = encode_reply(
        ReplyMessage(
            message_id="ghost:reserve:execute:1:reply",
            saga_id="ghost",
            saga_type="order",
            step="reserve",
            attempt=1,
            kind=StepKind.EXECUTE,
            status=ReplyStatus.SUCCEEDED,
            created_at=datetime(2030, 1, 1, tzinfo=UTC),
        ),
        "sagas.replies.default",
    )
    async with running(sagas=[order_saga()], bus=bus, orphan_replies=OrphanReplyPolicy.DEAD_LETTER):
        await bus.publish([orphan])

        async def parked() -> bool:
            return bool(bus.dead_letters())

        await eventually(parked)

    [dead] = bus.dead_letters()
    assert dead.message_id == orphan.message_id
    assert dead.headers[HEADER_REASON] == "reply for a saga that does not exist"


async def test_start_and_stop_are_idempotent() -> None:
    runtime = SagaRuntime(sagas=[order_saga()])
    async with asyncio.timeout(WAIT):
        await runtime.start()
        await runtime.start()
        assert runtime.running
        await runtime.stop()
        await runtime.stop()
    assert not runtime.running


def test_tune_gc_freezes_what_start_up_made_and_collects_the_young_less_often() -> None:
    # In a process of its own: it changes the collector for the whole process.
    script = (
        "import gc\n"
        "from sagas_core.runtime import tune_gc\n"
        "before = gc.get_threshold()\n"
        "tune_gc(5000)\n"
        "after = gc.get_threshold()\n"
        "print(after[0], after[1:] == before[1:], gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["5000", "True", "True"]


def test_tune_gc_refuses_a_threshold_below_one() -> None:
    with pytest.raises(ValueError, match="young must be >= 1"):
        tune_gc(0)


async def test_the_in_memory_bus_keeps_only_the_latest_messages_when_told_to() -> None:
    # A runtime or worker without a broker runs on the in-memory bus for as long as the process
    # lives: it must not keep every message it ever published.
    bus = InMemoryBus(keep_published=3)
    sent = [_event(n) for n in range(10)]
    for envelope in sent:
        await bus.publish([envelope])

    assert 3 <= len(bus.published) < 6
    assert bus.published == sent[-len(bus.published) :]
    assert InMemoryBus().keep_published is None  # tests see everything by default
    runtime_bus = SagaRuntime(sagas=[]).bus
    assert isinstance(runtime_bus, InMemoryBus)
    assert runtime_bus.keep_published == 10_000
    with pytest.raises(ValueError, match="keep_published must be at least 1"):
        InMemoryBus(keep_published=0)


def _event(number: int) -> Envelope:
    return Envelope(
        message_id=f"event-{number}",
        route=RouteKind.EVENT,
        key="order.completed",
        message_type="OrderCompleted",
        body=b"{}",
        timestamp=datetime(2030, 1, 1, tzinfo=UTC),
    )


class StuckBus(InMemoryBus):
    """A bus whose publishes never return (a broker that stopped confirming)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = asyncio.Event()

    async def publish(self, envelopes: Any) -> None:
        self.stuck.set()
        await asyncio.Event().wait()


async def test_stop_gives_up_on_a_stuck_relay_after_the_grace_and_keeps_the_outbox(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = StuckBus()
    runtime = SagaRuntime(sagas=[order_saga()], bus=bus, relay_poll_interval=0.05)
    async with asyncio.timeout(WAIT * 2):
        await runtime.start()
        await runtime.start_saga("order", data(), saga_id="saga-1")
        await bus.stuck.wait()  # the relay is inside a publish that never returns

        await runtime.stop(grace=0.1)  # gives up cleanly: no TimeoutError

    assert not runtime.running
    left = await runtime.store.pending_count()  # the command and the status event
    assert left >= 1  # safe in the outbox for the next start
    assert f"{left} outbox message(s) left unpublished" in caplog.text
    assert "sagas-outbox-relay did not stop within 0.1s" in caplog.text


async def test_the_worker_exits_0_on_sigterm_when_the_relay_is_stuck_past_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = StuckBus()
    host = (
        SagaHost.builder()
        .use_settings(SagasSettings(graceful_timeout=0.1))
        .use_memory()
        .use_bus(bus)
        .add_saga(order_saga())
        .build()
    )
    async with asyncio.timeout(WAIT * 2):
        worker = asyncio.create_task(run_worker(host, ready_message=False))
        await eventually(lambda: host.started, what="the host started")
        await host.start_saga("order", data(), saga_id="saga-1")
        await bus.stuck.wait()

        os.kill(os.getpid(), signal.SIGTERM)  # run_worker's handler takes it while it runs

        assert await worker == 0
    assert "left unpublished" in caplog.text
