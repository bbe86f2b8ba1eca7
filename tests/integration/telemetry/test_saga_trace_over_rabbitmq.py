"""One saga reads as one trace over the real broker: spans, links, errors and metrics.

The participants run in this process on their own connection, so the only way a span context
reaches them is the AMQP headers; the orchestrator's reply handling likewise.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from sagas_abstractions import Envelope, SagaStatus
from sagas_core import Participant, SagaRuntime
from tests.integration.rabbitmq.rabbit_travel import Ledger, TripData, participants, trip_saga
from tests.integration.telemetry.conftest import BusFactory
from tests.integration.telemetry.otel_support import (
    Otel,
    ids,
    linked,
    parent_of,
    traceparent,
)

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

COMMANDS = [
    ("flights", "book-flight", "execute"),
    ("hotels", "book-hotel", "execute"),
    ("cars", "book-car", "execute"),
    ("hotels", "book-hotel", "compensate"),
    ("flights", "book-flight", "compensate"),
]


def _recording_headers(participant: Participant, seen: list[dict[str, str]]) -> None:
    """Keep the headers of every command the participant gets off the broker."""
    process = participant.process

    async def recording(envelope: Envelope) -> Envelope | None:
        seen.append(dict(envelope.headers))
        return await process(envelope)

    participant.process = recording  # type: ignore[method-assign]


async def _run_failing_trip(otel: Otel, connect: BusFactory) -> tuple[Any, list[dict[str, str]]]:
    headers: list[dict[str, str]] = []
    participant_bus = await connect(group="participants")
    for participant in participants(Ledger()):
        participant.telemetry = otel.telemetry
        _recording_headers(participant, headers)
        await participant.attach(participant_bus, concurrency=4)
    orchestrator_bus = await connect(group="orchestrator")
    async with SagaRuntime(
        sagas=[trip_saga()],
        bus=orchestrator_bus,
        group="otel",
        telemetry=otel.telemetry,
        telemetry_interval=0.05,
    ) as runtime:
        saga = await runtime.start_saga("trip-booking", TripData(trip_id="t-1", fail_car=True))
        done = await runtime.wait_for(saga.saga_id, timeout=20)
    await participant_bus.close()  # lets the participants' last spans end
    return done, headers


async def test_a_compensated_saga_is_one_trace_of_producer_consumer_and_compensation_spans(
    otel: Otel, connect: BusFactory
) -> None:
    done, headers = await _run_failing_trip(otel, connect)
    assert done.status is SagaStatus.COMPENSATED
    saga_id = done.saga_id

    start = otel.one("saga start trip-booking")
    assert start.kind is SpanKind.INTERNAL
    assert start.attributes is not None
    assert start.attributes["saga.id"] == saga_id
    assert start.attributes["saga.type"] == "trip-booking"
    assert start.attributes["saga.status"] == "running"
    assert start.context is not None
    # The start context is stored on the saga row, for spans that come hours later.
    assert parent_of(done.trace_context["traceparent"]) == traceparent(start.context)

    saga_spans = [
        span for span in otel.finished() if (span.attributes or {}).get("saga.id") == saga_id
    ]
    assert {span.context.trace_id for span in saga_spans if span.context} == {
        start.context.trace_id
    }

    for destination, step, kind in COMMANDS:
        where = {"saga.step": step, "saga.kind": kind}
        publish = otel.one(f"publish {destination}", **where)
        process = otel.one(f"process {destination}", **where)
        assert publish.kind is SpanKind.PRODUCER
        assert process.kind is SpanKind.CONSUMER
        for span, operation in ((publish, "publish"), (process, "process")):
            attributes = span.attributes or {}
            assert attributes["messaging.system"] == "rabbitmq"
            assert attributes["messaging.operation.type"] == operation
            assert attributes["messaging.destination.name"] == destination
            assert attributes["messaging.message.conversation_id"] == saga_id
            assert attributes["messaging.message.id"] == f"{saga_id}:{step}:{kind}:1"
            assert attributes["saga.attempt"] == 1
            assert attributes["saga.type"] == "trip-booking"
        # Across the broker: the consumer is a child of the producer span and linked to it,
        # through the traceparent the AMQP message carried.
        assert publish.context is not None
        assert process.parent is not None
        assert process.parent.is_remote
        assert process.parent.span_id == publish.context.span_id
        assert ids(publish.context) in linked(process)
        assert traceparent(publish.context) in [parent_of(h.get("traceparent")) for h in headers]

    # The failing step: an error on the participant's span and on the reply's processing.
    failing = otel.one("process cars", **{"saga.step": "book-car"})
    assert failing.status.status_code is StatusCode.ERROR
    assert (failing.attributes or {})["error.type"] == "sold_out"
    assert [event.name for event in failing.events] == ["exception"]
    replies = otel.named("process sagas.replies.otel")
    assert len(replies) == 5
    failed_reply = [r for r in replies if (r.attributes or {}).get("saga.step") == "book-car"]
    assert [r.status.status_code for r in failed_reply] == [StatusCode.ERROR]
    assert (failed_reply[0].attributes or {})["saga.status"] == "compensating"
    for reply in replies:
        assert reply.kind is SpanKind.CONSUMER
        assert ids(start.context) in linked(reply)  # every reply links back to the saga's start
        assert reply.parent is not None
        assert reply.parent.is_remote  # the participant's reply publish, from the headers
    assert (replies[-1].attributes or {})["saga.status"] == "compensated"

    # Compensation runs in reverse order, after the failure.
    compensations = [
        span
        for span in otel.finished()
        if span.kind is SpanKind.CONSUMER
        and (span.attributes or {}).get("saga.kind") == "compensate"
    ]
    assert [span.name for span in compensations] == [
        "process hotels",
        "process sagas.replies.otel",
        "process flights",
        "process sagas.replies.otel",
    ]
    assert all(span.status.status_code is StatusCode.UNSET for span in compensations)


async def test_metrics_count_the_saga_its_steps_and_its_compensation(
    otel: Otel, connect: BusFactory
) -> None:
    done, _ = await _run_failing_trip(otel, connect)
    assert done.status is SagaStatus.COMPENSATED

    saga = {"saga.type": "trip-booking"}
    assert otel.value("saga.started", **saga) == 1
    assert otel.value("saga.compensated", **saga) == 1
    assert otel.value("saga.completed", **saga) is None
    assert otel.value("saga.failed", **saga) is None
    assert otel.value("saga.active", **saga) == 0
    count, seconds = otel.value("saga.duration", **saga, **{"saga.outcome": "compensated"})
    assert count == 1
    assert seconds > 0
    for step, outcome in (
        ("book-flight", "succeeded"),
        ("book-hotel", "succeeded"),
        ("book-car", "failed"),
    ):
        count, _ = otel.value("saga.step.duration", **{"saga.step": step, "saga.outcome": outcome})
        assert count == 1, step
    assert otel.value("saga.step.retries") is None
    assert otel.value("saga.timeouts") is None
    assert otel.value("saga.outbox.lag") is not None
    assert otel.value("saga.outbox.size") is not None
    assert otel.value("saga.oldest_active.age", **{"saga.status": "running"}) is not None
    # Never the saga id on a metric: attributes stay low-cardinality.
    for points in otel.points().values():
        for attributes, _ in points:
            assert done.saga_id not in attributes.values()
            assert "saga.id" not in attributes
