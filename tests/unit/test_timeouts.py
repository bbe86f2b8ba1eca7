"""The timeout service: claims under its own owner name, so competing services share the work."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

from sagas_core import Orchestrator, SagaBuilder
from sagas_core.testing import FakeClock, InMemorySagaStore
from sagas_core.timeouts import TimeoutService


class Data(BaseModel):
    pass


class Call(BaseModel):
    pass


SAGA = (
    SagaBuilder("call", data=Data).step("call").send(Call, to="service").timeout(seconds=1).build()
)


def test_each_service_claims_under_its_own_owner_with_a_lease_of_at_least_five_seconds() -> None:
    orchestrator = Orchestrator(store=InMemorySagaStore(), definitions=[SAGA], clock=FakeClock())

    one = TimeoutService(orchestrator)
    two = TimeoutService(orchestrator, interval=2)
    named = TimeoutService(orchestrator, owner="worker-7", lease=0.5)

    assert one.owner != two.owner
    assert (one.lease, two.lease) == (timedelta(seconds=5), timedelta(seconds=20))
    assert (named.owner, named.lease) == ("worker-7", timedelta(seconds=0.5))


async def test_competing_services_fire_disjoint_batches() -> None:
    store = InMemorySagaStore()
    clock = FakeClock()
    services = [
        TimeoutService(Orchestrator(store=store, definitions=[SAGA], clock=clock), batch_size=3)
        for _ in range(3)
    ]
    for n in range(9):
        await services[0].orchestrator.start("call", {}, saga_id=f"saga-{n}")
    clock.advance(1)

    fired = await asyncio.gather(*(service.run_once() for service in services))

    assert fired == [3, 3, 3]
    assert sum(service.orchestrator.conflicts for service in services) == 0
    for n in range(9):
        inputs = [entry.input for entry in await store.history(f"saga-{n}")]
        assert inputs == ["Start", "Timeout"]
