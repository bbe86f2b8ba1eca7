"""Spans and metrics of deadlines, retries and operator actions; publishing after a restart;
and the no-op path (no SDK configured, or no OpenTelemetry installed at all)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from sagas_abstractions import ParticipantError, SagaStatus
from sagas_core import (
    CircuitBreaker,
    Orchestrator,
    Participant,
    SagaBuilder,
    SagaRuntime,
    SystemClock,
    exponential,
)
from sagas_core.definition import SagaDefinition
from sagas_core.telemetry import Telemetry
from sagas_core.testing import InMemoryBus, InMemorySagaStore
from tests.integration.telemetry.otel_support import Otel, ids, linked, make_otel


class Order(BaseModel):
    order_id: str


class Reserve(BaseModel):
    order_id: str


def unanswered_saga(timeout: float = 0.1, attempts: int = 2) -> SagaDefinition:
    """One step sent to a destination nobody serves: it times out."""
    return (
        SagaBuilder("unanswered", data=Order)
        .step("reserve")
        .send(Reserve, to="nobody")
        .timeout(seconds=timeout)
        .retry(attempts=attempts, backoff=exponential(0.01, max=0.02))
        .build()
    )


async def test_timeouts_and_retries_are_spans_in_the_saga_trace_and_are_counted(
    otel: Otel,
) -> None:
    async with SagaRuntime(sagas=[unanswered_saga()], telemetry=otel.telemetry) as runtime:
        saga = await runtime.start_saga("unanswered", Order(order_id="o-1"))
        done = await runtime.wait_for(saga.saga_id, timeout=10)
    assert done.status is SagaStatus.COMPENSATED

    start = otel.one("saga start unanswered")
    timeouts = otel.named("saga timeout unanswered")
    retries = otel.named("saga retry unanswered")
    assert len(timeouts) == 2
    assert len(retries) == 1
    for span in [*timeouts, *retries]:
        assert span.kind is SpanKind.INTERNAL
        # No span stays open while the saga waits: these join the trace through the start
        # context stored on the saga row, as children of it and linked to it.
        assert span.parent is not None
        assert span.parent.span_id == ids(start.context)[1]
        assert ids(start.context) in linked(span)
        assert (span.attributes or {})["saga.id"] == saga.saga_id
        assert (span.attributes or {})["saga.step"] == "reserve"
    assert [(s.attributes or {})["saga.attempt"] for s in timeouts] == [1, 2]
    assert (timeouts[-1].attributes or {})["saga.status"] == "compensated"
    # The retried command is published under the retry span.
    republished = otel.one("publish nobody", **{"saga.attempt": 2})
    assert republished.parent is not None
    assert republished.parent.span_id == ids(retries[0].context)[1]

    assert (
        otel.value("saga.timeouts", **{"saga.step": "reserve", "saga.timeout.scope": "step"}) == 2
    )
    assert otel.value("saga.step.retries", **{"saga.step": "reserve"}) == 1
    assert otel.value("saga.compensated", **{"saga.type": "unanswered"}) == 1
    count, _ = otel.value("saga.step.duration", **{"saga.outcome": "timed_out"})
    assert count == 1


async def test_an_operator_action_is_a_span_linked_to_the_saga_start(otel: Otel) -> None:
    async with SagaRuntime(
        sagas=[unanswered_saga(timeout=60)], telemetry=otel.telemetry
    ) as runtime:
        saga = await runtime.start_saga("unanswered", Order(order_id="o-2"))
        await runtime.orchestrator.compensate(saga.saga_id, actor="alice", reason="customer")
        done = await runtime.wait_for(saga.saga_id, timeout=10)
    assert done.status is SagaStatus.COMPENSATED

    start = otel.one("saga start unanswered")
    action = otel.one("saga compensate unanswered")
    assert (action.attributes or {})["saga.actor"] == "alice"
    assert (action.attributes or {})["saga.status"] == "compensated"
    assert ids(start.context) in linked(action)
    assert ids(action.context)[0] == ids(start.context)[0]


async def test_a_command_published_after_a_restart_still_joins_its_saga_trace() -> None:
    store = InMemorySagaStore()
    before, after = make_otel(), make_otel()
    crashed = SagaRuntime(
        sagas=[unanswered_saga(timeout=60)], store=store, telemetry=before.telemetry
    )
    # Committed with its outbox row, but the process "dies" before the relay publishes it.
    saga = await crashed.orchestrator.start("unanswered", Order(order_id="o-3"))
    assert after.finished() == []

    bus = InMemoryBus()
    async with SagaRuntime(
        sagas=[unanswered_saga(timeout=60)], store=store, bus=bus, telemetry=after.telemetry
    ) as restarted:
        await restarted.relay.flush(timeout=5)
    start = before.one("saga start unanswered")
    publish = after.one("publish nobody")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.is_remote
    assert (publish.parent.trace_id, publish.parent.span_id) == ids(start.context)
    assert (publish.attributes or {})["messaging.system"] == "sagas.in_memory"
    assert (publish.attributes or {})["saga.id"] == saga.saga_id
    await bus.close()


async def test_without_an_sdk_nothing_is_traced_or_recorded_and_sagas_run() -> None:
    # This process never sets a global provider (the other tests inject theirs).
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    telemetry = Telemetry()
    assert telemetry.tracer is None
    assert telemetry.instruments is None
    bus = InMemoryBus()
    async with SagaRuntime(sagas=[unanswered_saga(timeout=0.05, attempts=1)], bus=bus) as runtime:
        saga = await runtime.start_saga("unanswered", Order(order_id="o-4"))
        done = await runtime.wait_for(saga.saga_id, timeout=10)
    assert done.status is SagaStatus.COMPENSATED
    assert done.trace_context == {}
    assert bus.published
    assert all("traceparent" not in envelope.headers for envelope in bus.published)
    await bus.close()


def test_sagas_run_without_opentelemetry_installed() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # as if the package were not installed
        from pydantic import BaseModel
        import sagas_core
        from sagas_core.telemetry import Telemetry, configure_from_env

        class Order(BaseModel):
            order_id: str

        class Reserve(BaseModel):
            order_id: str

        definition = (
            sagas_core.SagaBuilder("unanswered", data=Order)
            .step("reserve").send(Reserve, to="nobody").timeout(seconds=0.05)
            .build()
        )

        async def main():
            assert Telemetry().tracer is None and Telemetry().instruments is None
            async with sagas_core.SagaRuntime(sagas=[definition]) as runtime:
                saga = await runtime.start_saga("unanswered", Order(order_id="x"))
                print((await runtime.wait_for(saga.saga_id, timeout=10)).status)

        import os
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
        assert configure_from_env() is False
        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "compensated"


def test_importing_sagas_core_does_not_import_opentelemetry() -> None:
    script = "import sys, sagas_core; print('opentelemetry' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


class Charge(BaseModel):
    order_id: str


class Refund(BaseModel):
    order_id: str


class Ship(BaseModel):
    order_id: str


async def test_a_compensation_that_fails_for_good_is_counted_as_failed_and_dead_lettered(
    otel: Otel,
) -> None:
    definition = (
        SagaBuilder("stuck-refund", data=Order)
        .step("charge")
        .send(Charge, to="payments")
        .compensate_with(Refund)
        .step("ship")
        .send(Ship, to="shipping")
        .build()
    )
    payments, shipping = Participant("payments"), Participant("shipping")

    @payments.handles(Charge)
    async def charge(command: Charge) -> None:
        return None

    @payments.handles(Refund)
    async def refund(command: Refund) -> None:
        raise ParticipantError("the refund API is gone", code="refund_gone")

    @shipping.handles(Ship)
    async def ship(command: Ship) -> None:
        raise ParticipantError("nowhere to ship", code="no_route")

    async with SagaRuntime(
        sagas=[definition], participants=[payments, shipping], telemetry=otel.telemetry
    ) as runtime:
        saga = await runtime.start_saga("stuck-refund", Order(order_id="o-5"))
        done = await runtime.wait_for(saga.saga_id, timeout=10)
    assert done.status is SagaStatus.FAILED

    assert otel.value("saga.failed", **{"saga.type": "stuck-refund"}) == 1
    assert otel.value("saga.dead_lettered", **{"saga.step": "charge"}) == 1
    assert otel.value("saga.active", **{"saga.type": "stuck-refund"}) == 0
    refund_span = otel.one("process payments", **{"saga.kind": "compensate"})
    assert refund_span.status.status_code is StatusCode.ERROR
    assert (refund_span.attributes or {})["error.type"] == "refund_gone"


def test_each_destination_circuit_is_a_gauge(otel: Otel) -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for=timedelta(minutes=1))
    Orchestrator(
        store=InMemorySagaStore(),
        definitions=[],
        clock=SystemClock(),
        breaker=breaker,
        telemetry=otel.telemetry,
    )
    breaker.record_failure("payments", datetime.now(UTC))
    assert otel.value("saga.circuit.state", **{"messaging.destination.name": "payments"}) == 2
    breaker.record_success("payments")
    assert otel.value("saga.circuit.state", **{"messaging.destination.name": "payments"}) == 0


class OrderPlaced(BaseModel):
    order_id: str


async def test_an_event_that_starts_a_saga_is_a_consumer_span_parenting_the_saga_start(
    otel: Otel,
) -> None:
    saga = (
        SagaBuilder("placed", data=Order)
        .starts_on(OrderPlaced, saga_id="order_id")
        .step("reserve")
        .send(Reserve, to="nobody")
        .build()
    )
    async with SagaRuntime(sagas=[saga], telemetry=otel.telemetry) as runtime:
        await runtime.publish_event(OrderPlaced(order_id="o-9"), message_id="placed-1")
        for _ in range(200):
            if await runtime.orchestrator.store.load("o-9") is not None:
                break
            await asyncio.sleep(0.01)
        started = await runtime.orchestrator.store.load("o-9")
    assert started is not None

    process = otel.one("process OrderPlaced")
    start = otel.one("saga start placed")
    assert process.kind is SpanKind.CONSUMER
    assert start.parent is not None
    assert ids(start.context)[0] == ids(process.context)[0]
    assert start.parent.span_id == process.context.span_id
