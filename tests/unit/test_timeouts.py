"""The timeout service: claims under its own owner name, so competing services share the work."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import StoreUnavailable
from sagas_core import Orchestrator, SagaBuilder
from sagas_core.clock import SystemClock
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


QUICK = (
    SagaBuilder("quick", data=Data)
    .step("call")
    .send(Call, to="service")
    .timeout(seconds=0.2)
    .build()
)


async def _run_until_fired(service: TimeoutService, count: int = 1) -> None:
    """Run the service until it has fired ``count`` inputs (10 s at most), then stop it."""
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while service.fired < count:
                await asyncio.sleep(0.01)
    finally:
        service.stop()
        await task


async def test_a_following_service_polls_at_the_deadlines_it_committed_not_all_the_time() -> None:
    store = InMemorySagaStore()
    orchestrator = Orchestrator(store=store, definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(orchestrator, interval=0.01, idle_interval=30)

    await orchestrator.start("quick", {}, saga_id="q-1")
    await _run_until_fired(service)

    assert service.tracking
    # The poll at start and the one at the deadline (and one more if woken a hair early);
    # polling every 10 ms would have taken ~20 to get there.
    assert service.polls <= 4
    assert [entry.input for entry in await store.history("q-1")][:2] == ["Start", "Timeout"]


async def test_a_following_service_finds_deadlines_committed_elsewhere_by_its_idle_polls() -> None:
    store = InMemorySagaStore()
    elsewhere = Orchestrator(store=store, definitions=[QUICK], clock=SystemClock())
    here = Orchestrator(store=store, definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(here, interval=0.01, idle_interval=0.3)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.sleep(0.05)  # the service polled at start and sleeps: nothing followed
        await elsewhere.start("quick", {}, saga_id="q-2")
        async with asyncio.timeout(10):
            while service.fired < 1:
                await asyncio.sleep(0.01)
    finally:
        service.stop()
        await task

    assert service.fired == 1
    assert "Timeout" in [entry.input for entry in await store.history("q-2")]


async def test_an_idle_following_service_asks_the_store_every_idle_interval() -> None:
    orchestrator = Orchestrator(store=InMemorySagaStore(), definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(orchestrator, interval=0.01, idle_interval=0.2)
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0.5)
    service.stop()
    await task

    assert 1 <= service.polls <= 5  # every 10 ms would be ~50


async def test_past_max_tracked_sagas_the_service_stops_following_and_polls_often() -> None:
    orchestrator = Orchestrator(store=InMemorySagaStore(), definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(orchestrator, interval=0.01, idle_interval=30, max_tracked=2)
    for n in range(3):
        await orchestrator.start("quick", {}, saga_id=f"q-{n}")

    assert not service.tracking
    await _run_until_fired(service, count=3)  # found by polling every 10 ms, not in 30 s


def test_following_needs_an_idle_interval_and_the_system_clock() -> None:
    fake = Orchestrator(store=InMemorySagaStore(), definitions=[QUICK], clock=FakeClock())
    real = Orchestrator(store=InMemorySagaStore(), definitions=[QUICK], clock=SystemClock())

    assert not TimeoutService(fake, idle_interval=1).tracking
    assert not TimeoutService(real).tracking
    assert TimeoutService(real, idle_interval=1).tracking
    with pytest.raises(ValueError, match=r"idle_interval \(0.05 s\) must not be shorter"):
        TimeoutService(real, interval=0.1, idle_interval=0.05)


async def test_a_failed_poll_forgets_no_followed_deadline() -> None:
    store = InMemorySagaStore()
    orchestrator = Orchestrator(store=store, definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(orchestrator, interval=0.01, idle_interval=30)
    fire_due = orchestrator.fire_due
    failures = 0

    async def failing_first(**kwargs: Any) -> int:
        nonlocal failures
        if failures < 3:  # the poll at start and those around the deadline fail
            failures += 1
            await asyncio.sleep(0.15)
            raise RuntimeError("store unreachable")
        return await fire_due(**kwargs)

    orchestrator.fire_due = failing_first  # type: ignore[method-assign]
    await orchestrator.start("quick", {}, saga_id="q-f")
    await _run_until_fired(service)  # within 10 s: the idle poll would come after 30

    assert failures == 3
    assert "Timeout" in [entry.input for entry in await store.history("q-f")]


class DownStore(InMemorySagaStore):
    """Its deadline queries find the database away for the first ``down`` polls."""

    def __init__(self, down: int) -> None:
        super().__init__()
        self.down = down

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        if self.down > 0:
            self.down -= 1
            raise StoreUnavailable("connection refused")
        return await super().claim_due(*args, **kwargs)


async def test_a_database_outage_is_logged_once_not_with_a_traceback_per_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = DownStore(down=5)
    orchestrator = Orchestrator(store=store, definitions=[QUICK], clock=SystemClock())
    service = TimeoutService(orchestrator, interval=0.01)
    await orchestrator.start("quick", {}, saga_id="q-1")

    with caplog.at_level(logging.DEBUG, logger="sagas.timeouts"):
        await _run_until_fired(service)

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("timeout service: the store is unavailable (connection refused)")
    assert warnings[1].startswith("timeout service: back after")
    assert all(r.exc_info is None for r in caplog.records)
    assert [entry.input for entry in await store.history("q-1")][:2] == ["Start", "Timeout"]
