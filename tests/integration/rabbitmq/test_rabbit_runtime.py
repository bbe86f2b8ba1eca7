"""Sagas end to end over the real broker: orchestrator and participants on separate connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sagas_abstractions import SagaStatus, StepStatus
from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from tests.integration.rabbitmq.rabbit_travel import (
    COMPENSATED_EFFECTS,
    COMPLETED_EFFECTS,
    EXPECTED_STATUS,
    Ledger,
    TripData,
    participants,
    trip_saga,
)

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]


async def test_a_three_step_saga_completes_and_one_whose_last_step_fails_compensates(
    connect: BusFactory,
) -> None:
    ledger = Ledger()
    participant_bus = await connect(group="participants")
    for participant in participants(ledger):
        await participant.attach(participant_bus, concurrency=4)
    orchestrator_bus = await connect(group="orchestrator")

    async with SagaRuntime(sagas=[trip_saga()], bus=orchestrator_bus, group="e2e") as runtime:
        ok = await runtime.start_saga("trip-booking", TripData(trip_id="t-ok"))
        bad = await runtime.start_saga("trip-booking", TripData(trip_id="t-bad", fail_car=True))
        done_ok = await runtime.wait_for(ok.saga_id, timeout=15)
        done_bad = await runtime.wait_for(bad.saga_id, timeout=15)

    assert done_ok.status is SagaStatus.COMPLETED
    assert done_ok.data["car_id"] == "C-t-ok"
    assert ledger.of("t-ok") == COMPLETED_EFFECTS
    assert done_bad.status is SagaStatus.COMPENSATED
    assert [step.status for step in done_bad.steps] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
    ]
    assert ledger.of("t-bad") == COMPENSATED_EFFECTS  # undone in reverse order
    assert done_bad.error is not None
    assert done_bad.error.code == "sold_out"
    assert ledger.applied_twice() == []


async def test_many_sagas_in_parallel_all_settle(connect: BusFactory) -> None:
    ledger = Ledger()
    participant_bus = await connect(group="participants")
    for participant in participants(ledger):
        await participant.attach(participant_bus, concurrency=8)
    orchestrator_bus = await connect(group="orchestrator")
    trips = {f"t-{n}": n % 4 == 0 for n in range(40)}

    async with SagaRuntime(sagas=[trip_saga()], bus=orchestrator_bus, group="e2e") as runtime:
        started = [
            await runtime.start_saga("trip-booking", TripData(trip_id=trip, fail_car=fail))
            for trip, fail in trips.items()
        ]
        finished = await asyncio.gather(
            *(runtime.wait_for(saga.saga_id, timeout=20) for saga in started)
        )

    for saga, (trip, fail) in zip(finished, trips.items(), strict=True):
        assert saga.status is EXPECTED_STATUS[fail], trip
        assert ledger.of(trip) == (COMPENSATED_EFFECTS if fail else COMPLETED_EFFECTS)
    assert ledger.applied_twice() == []
