"""Timeouts, retries, compensation and dead-lettering in real time on RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    Envelope,
    ParticipantError,
    RetryableError,
    RouteKind,
    SagaStatus,
    StepStatus,
)
from sagas_core import Participant, RetryPolicy, SagaBuilder, SagaRuntime, fixed
from sagas_core.codec import HEADER_ATTEMPT, HEADER_ERROR_CODE, HEADER_REASON, HEADER_STEP
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.conftest import BusFactory

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres]


class Trip(BaseModel):
    trip_id: str
    booking: str | None = None


class BookHotel(BaseModel):
    trip_id: str


class CancelHotel(BaseModel):
    trip_id: str


class Charge(BaseModel):
    trip_id: str


trip_saga = (
    SagaBuilder("trip-failures", data=Trip)
    .step("book-hotel")
    .send(BookHotel, to="hotels")
    .compensate_with(CancelHotel, timeout=0.5, retry=RetryPolicy(attempts=2, backoff=fixed(0.1)))
    .timeout(seconds=0.3)
    .retry(attempts=3, backoff=fixed(0.05))
    .step("charge")
    .send(Charge, to="payments")
    .timeout(seconds=0.3)
    .retry(attempts=2, backoff=fixed(0.05))
    .build()
)


class Hotels:
    """A hotel service whose slowness and cancellation failures the tests script."""

    def __init__(self) -> None:
        self.slow_first = False
        self.cancel_fails = False
        self.bookings: list[str] = []
        self.cancellations: list[str] = []

    def participant(self) -> Participant:
        hotels = Participant("hotels")

        @hotels.handles(BookHotel)
        async def book(cmd: BookHotel) -> dict[str, str]:
            if self.slow_first and not self.bookings:
                await asyncio.sleep(0.6)  # longer than the 0.3 s step timeout
            self.bookings.append(cmd.trip_id)
            return {"booking": f"H-{cmd.trip_id}"}

        @hotels.handles(CancelHotel)
        async def cancel(cmd: CancelHotel) -> None:
            if self.cancel_fails:
                raise RetryableError("hotel system offline", code="hotel_offline")
            self.cancellations.append(cmd.trip_id)

        return hotels


def payments(*, down: bool = False, decline: bool = False) -> list[Participant]:
    if down:
        return []  # nobody consumes the payments queue: every charge times out
    participant = Participant("payments")

    @participant.handles(Charge)
    async def charge(cmd: Charge) -> None:
        if decline:
            raise ParticipantError("card declined", code="declined")

    return [participant]


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    store = SqlSagaStore.from_url(
        postgres_url, table_prefix=f"f{uuid.uuid4().hex[:8]}_", create_tables=True
    )
    try:
        yield store
    finally:
        await store.drop_tables()
        await store.close()


async def _run(
    connect: BusFactory,
    store: SqlSagaStore,
    participants: list[Participant],
) -> SagaRuntime:
    runtime = SagaRuntime(
        sagas=[trip_saga],
        participants=participants,
        store=store,
        bus=await connect(),
        timeout_interval=0.05,
        relay_poll_interval=0.1,
    )
    await runtime.start()
    return runtime


async def test_a_slow_participant_is_retried_and_the_saga_completes(
    connect: BusFactory, store: SqlSagaStore
) -> None:
    hotels = Hotels()
    hotels.slow_first = True
    runtime = await _run(connect, store, [hotels.participant(), *payments()])
    try:
        saga = await runtime.start_saga(trip_saga, Trip(trip_id="t1"))
        done = await runtime.wait_for(saga.saga_id, timeout=20)
        history = await runtime.orchestrator.history(saga.saga_id)
    finally:
        await runtime.stop(grace=5)
    assert done.status is SagaStatus.COMPLETED
    assert done.data["booking"] == "H-t1"
    # The first attempt timed out. Either the retry got its outcome from the participant's
    # cache, or (on a loaded machine) its late reply came before the retry was due and was taken:
    # both ways the hotel was booked exactly once.
    assert hotels.bookings == ["t1"]
    assert any(row.input == "Timeout" and row.step == "book-hotel" for row in history)


async def test_a_participant_that_is_down_times_out_and_the_done_steps_are_compensated(
    connect: BusFactory, store: SqlSagaStore
) -> None:
    hotels = Hotels()
    runtime = await _run(connect, store, [hotels.participant(), *payments(down=True)])
    try:
        saga = await runtime.start_saga(trip_saga, Trip(trip_id="t2"))
        done = await runtime.wait_for(saga.saga_id, timeout=20)
    finally:
        await runtime.stop(grace=5)
    assert done.status is SagaStatus.COMPENSATED
    assert [s.status for s in done.steps] == [StepStatus.COMPENSATED, StepStatus.SKIPPED]
    assert done.steps[1].attempts == 2
    assert hotels.cancellations == ["t2"]


async def test_a_compensation_that_keeps_failing_is_dead_lettered_and_an_operator_retry_ends_it(
    connect: BusFactory, store: SqlSagaStore
) -> None:
    hotels = Hotels()
    hotels.cancel_fails = True
    runtime = await _run(connect, store, [hotels.participant(), *payments(decline=True)])
    dead: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        dead.append(envelope)

    watcher = await runtime.bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", collect)
    try:
        saga = await runtime.start_saga(trip_saga, Trip(trip_id="t3"))
        parked = await runtime.wait_for(saga.saga_id, timeout=30)
        assert parked.status is SagaStatus.FAILED
        async with asyncio.timeout(10):
            while not dead:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing else may follow it

        hotels.cancel_fails = False
        await runtime.orchestrator.retry_compensation(
            saga.saga_id, actor="ops@example", reason="hotel system back"
        )
        done = await runtime.wait_for(saga.saga_id, timeout=20)
        history = await runtime.orchestrator.history(saga.saga_id)
    finally:
        await watcher.close()
        await runtime.stop(grace=5)

    assert len(dead) == 1
    letter = dead[0]
    assert letter.message_type == "CancelHotel"
    assert letter.correlation_id == saga.saga_id
    assert letter.headers[HEADER_STEP] == "book-hotel"
    assert letter.headers[HEADER_ERROR_CODE] == "hotel_offline"
    assert int(letter.headers[HEADER_ATTEMPT]) >= 1
    assert "book-hotel" in letter.headers[HEADER_REASON]
    assert done.status is SagaStatus.COMPENSATED
    assert hotels.cancellations == ["t3"]
    assert any(row.actor == "ops@example" and row.input == "RetryCompensation" for row in history)
