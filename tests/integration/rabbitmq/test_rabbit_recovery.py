"""Recovery: sagas in flight finish, nothing lost and no effect applied twice, when the broker
closes our connections mid-run; consumers come back.

Only this test's connections are closed (found by their connection name), not every
connection of the broker, so other users of a shared broker are left alone. The broker-restart
test (``stop_app``/``start_app``) restarts the shared broker: it runs only with
``SAGAS_TEST_BROKER_RESTART=1``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import aio_pika
import pytest

from sagas_abstractions import SagaInstance
from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import close_connections, list_consumers, rabbitmqctl
from tests.integration.rabbitmq.rabbit_travel import (
    COMPENSATED_EFFECTS,
    COMPLETED_EFFECTS,
    EXPECTED_STATUS,
    Ledger,
    TripData,
    participants,
    trip_saga,
)
from tests.waiting import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.rabbitmq,
    pytest.mark.usefixtures("needs_rabbitmqctl"),
]

BusFactory = Callable[..., Awaitable[RabbitBus]]
TRIPS = 30


async def _run_with_fault(
    connect: BusFactory,
    prefix: str,
    amqp_url: str,
    fault: Callable[[], Awaitable[None]],
) -> None:
    ledger = Ledger(delay=0.02)
    participant_bus = await connect(group="participants", publish_timeout=2.0)
    for participant in participants(ledger):
        await participant.attach(participant_bus, concurrency=4)
    orchestrator_bus = await connect(group="orchestrator", publish_timeout=2.0)
    trips = {f"t-{n}": n % 3 == 0 for n in range(TRIPS)}

    async with SagaRuntime(
        sagas=[trip_saga(step_timeout=5.0)], bus=orchestrator_bus, group="recovery"
    ) as runtime:
        started = [
            await runtime.start_saga("trip-booking", TripData(trip_id=trip, fail_car=fail))
            for trip, fail in trips.items()
        ]
        waiting = asyncio.gather(*(runtime.wait_for(saga.saga_id, timeout=45) for saga in started))
        async with asyncio.timeout(10):
            while len(ledger.effects) < TRIPS:
                await asyncio.sleep(0.01)
        in_flight = len(ledger.effects)

        await fault()

        finished: list[SagaInstance] = await waiting

        assert in_flight < 3 * TRIPS  # the fault really hit sagas in flight
        for saga, (trip, fail) in zip(finished, trips.items(), strict=True):
            assert saga.status is EXPECTED_STATUS[fail], trip
            assert ledger.of(trip) == (COMPENSATED_EFFECTS if fail else COMPLETED_EFFECTS), trip
        assert ledger.applied_twice() == []

        # The consumers are back: every queue we consume has its consumer again.
        await eventually(orchestrator_bus.is_ready, timeout=10)
        await eventually(participant_bus.is_ready, timeout=10)
        consumers = await asyncio.to_thread(list_consumers, f"{prefix}.")
        reply_to = runtime.orchestrator.reply_to
        expected = {
            orchestrator_bus.topology.reply_queue(reply_to): 1,
            orchestrator_bus.topology.affinity_queue(reply_to, orchestrator_bus.instance): 1,
            **{participant_bus.topology.command_queue(d): 1 for d in ("flights", "hotels", "cars")},
        }
        assert consumers == expected

    # Nothing stuck: every queue of the run is empty, the dead-letter queue included.
    assert await _ready_messages(amqp_url, orchestrator_bus.declared_queues) == dict.fromkeys(
        orchestrator_bus.declared_queues, 0
    )


async def _ready_messages(amqp_url: str, queues: frozenset[str]) -> dict[str, int]:
    counts = {}
    connection = await aio_pika.connect(amqp_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            declared = await channel.declare_queue(queue, passive=True)
            counts[queue] = declared.declaration_result.message_count or 0
    return counts


async def test_sagas_in_flight_finish_when_the_broker_closes_our_connections(
    connect: BusFactory, prefix: str, amqp_url: str
) -> None:
    closed: list[int] = []

    async def close_ours() -> None:
        closed.append(await asyncio.to_thread(close_connections, f"sagas:{prefix}:", "test"))

    await _run_with_fault(connect, prefix, amqp_url, close_ours)

    assert closed == [2]  # the orchestrator's and the participants' connections


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SAGAS_TEST_BROKER_RESTART") != "1",
    reason="restarts the shared broker; set SAGAS_TEST_BROKER_RESTART=1 to run it",
)
async def test_sagas_in_flight_finish_when_the_broker_app_restarts(
    connect: BusFactory, prefix: str, amqp_url: str
) -> None:
    async def restart() -> None:
        try:
            await asyncio.to_thread(rabbitmqctl, "stop_app", timeout=60)
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app", timeout=120)
            await asyncio.to_thread(rabbitmqctl, "await_startup", timeout=120)

    await _run_with_fault(connect, prefix, amqp_url, restart)
