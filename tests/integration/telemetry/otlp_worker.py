"""A worker-like process for the OTLP tests: ``configure_from_env``, run one saga, exit.

``python -m tests.integration.telemetry.otlp_worker`` runs the trip saga with its participants
in process (in-process bus); with ``order`` as argument it runs the order sample's
"card declined" order against participants in other processes, over the broker that
``SAGAS_AMQP_URL``/``SAGAS_RABBITMQ_PREFIX`` name. Prints the saga's status. The SDK flushes
spans and metrics when the process exits.
"""

from __future__ import annotations

import asyncio
import sys

from sagas_core import SagaHost
from sagas_core.telemetry import configure_from_env
from samples.order_processing.demo import scenarios
from samples.order_processing.saga import order_saga
from tests.integration.rabbitmq.rabbit_travel import Ledger, TripData, participants, trip_saga


async def trip() -> str:
    builder = SagaHost.builder().use_memory().add_saga(trip_saga())
    for participant in participants(Ledger()):
        builder.add_participant(participant)
    async with builder.build() as host:
        saga = await host.start_saga("trip-booking", TripData(trip_id="otlp", fail_car=True))
        done = await host.wait_for(saga.saga_id, timeout=20)
    return done.status.value


async def order() -> str:
    declined = next(s for s in scenarios() if s.name == "card declined")
    async with SagaHost.builder().use_memory().add_saga(order_saga).build() as host:
        saga = await host.start_saga(order_saga.name, declined.order)
        done = await host.wait_for(saga.saga_id, timeout=30)
    return done.status.value


if __name__ == "__main__":
    if not configure_from_env("sagas-worker"):
        sys.exit("configure_from_env did not configure the SDK")
    run = order if sys.argv[1:] == ["order"] else trip
    print(asyncio.run(run()))  # noqa: T201 - the test reads it
