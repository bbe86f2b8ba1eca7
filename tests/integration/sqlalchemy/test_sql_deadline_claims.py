"""Competing timeout services claiming due deadlines on one database.

Three orchestrators, each with its own store (its own engine and connection pool, as three
worker processes would have), fire the deadlines of the same fifty sagas at once. With claims
(an owner per worker) they take disjoint batches: every deadline fires exactly once and nobody
loses a race. Without claims every worker reads every due saga; the version check still makes
each deadline fire once, but the losers pay for it in conflicts and wasted loads.

A worker that dies holding claims loses nothing: once its lease has passed another worker takes
the sagas over.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import pytest

from sagas_abstractions import SagaInstance, SagaStatus
from sagas_core import Orchestrator, SagaBuilder
from sagas_core.clock import SystemClock
from sagas_core.definition import SagaDefinition
from sagas_core.testing import FakeClock
from sagas_core.timeouts import TimeoutService
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import (
    Bump,
    Tally,
    flaky_saga,
    sql_store,
    tokenless,
    unique_prefix,
)
from tests.integration.sqlalchemy.test_sql_racing import serial_result

pytestmark = pytest.mark.integration

WORKERS = 3
SAGAS = 50
RETRIES = 3
BATCH = 20  # three batches cover the fifty sagas: each worker must take its share
DEADLINE_INPUTS = frozenset({"Timeout", "RetryDue"})


class CountingStore(SqlSagaStore):
    """Counts loads (the work a worker does per due saga) and yields after each one, so
    workers that picked the same saga decide on the same version before saving."""

    loads = 0

    async def load(self, saga_id: str) -> SagaInstance | None:
        instance = await super().load(saga_id)
        self.loads += 1
        await asyncio.sleep(0.001)
        return instance


@dataclass(frozen=True)
class RaceResult:
    fired: int
    conflicts: int
    loads: int
    per_worker: list[int]


async def race(url: str, definition: SagaDefinition, *, claims: bool) -> RaceResult:
    """Three workers fire every round's deadlines at once; checks each round left none due."""
    clock = FakeClock()
    prefix = unique_prefix()
    saga_ids = [f"flaky-{n}" for n in range(SAGAS)]
    async with sql_store(url, prefix=prefix) as owner:
        stores = [CountingStore.from_url(url, table_prefix=prefix) for _ in range(WORKERS)]
        try:
            workers = [
                Orchestrator(store=store, definitions=[definition], clock=clock) for store in stores
            ]
            for saga_id in saga_ids:
                await workers[0].start(definition.name, {}, saga_id=saga_id)
            loads_at_start = sum(store.loads for store in stores)
            per_worker = [0] * WORKERS
            for _ in range(2 * RETRIES + 2):
                clock.advance(1)
                counts = await asyncio.gather(
                    *(
                        worker.fire_due(
                            limit=BATCH if claims else SAGAS,
                            owner=f"worker-{n}" if claims else None,
                        )
                        for n, worker in enumerate(workers)
                    )
                )
                per_worker = [
                    total + count for total, count in zip(per_worker, counts, strict=True)
                ]
                assert (
                    await owner.due(clock.now(), SAGAS) == []
                )  # every deadline of the round fired
        finally:
            for store in stores:
                await store.close()

        serial_store, serial = await serial_result(definition, "deadlines", saga_ids)
        finals = [saga for saga_id in saga_ids if (saga := await owner.load(saga_id))]
        assert tokenless(*finals) == tokenless(*serial)
        for final in finals:
            assert not final.status.is_active
            history = await owner.history(final.saga_id)
            applied = Counter(entry.version for entry in history if entry.outcome == "applied")
            assert applied == Counter(range(1, final.version + 1))  # no version applied twice
            fired_here = Counter(
                entry.version
                for entry in history
                if entry.outcome == "applied" and entry.input in DEADLINE_INPUTS
            )
            assert fired_here == Counter(range(2, final.version + 1))  # each deadline once
        assert await owner.pending_count() == await serial_store.pending_count()
        return RaceResult(
            fired=sum(per_worker),
            conflicts=sum(worker.conflicts for worker in workers),
            loads=sum(store.loads for store in stores) - loads_at_start,
            per_worker=per_worker,
        )


async def test_three_claiming_workers_fire_every_deadline_once_without_conflicts(
    url: str,
) -> None:
    definition = flaky_saga(RETRIES)

    claimed = await race(url, definition, claims=True)
    unclaimed = await race(url, definition, claims=False)

    print(  # noqa: T201 - the numbers are the point of this test
        f"\n{SAGAS} sagas, {WORKERS} workers, {claimed.fired} deadlines: "
        f"with claims {claimed.conflicts} conflicts / {claimed.loads} loads "
        f"(fired per worker {claimed.per_worker}); "
        f"without claims {unclaimed.conflicts} conflicts / {unclaimed.loads} loads "
        f"(fired per worker {unclaimed.per_worker})"
    )
    assert claimed.fired == unclaimed.fired
    assert claimed.conflicts == 0
    assert claimed.loads == claimed.fired  # one load per deadline: no wasted work
    assert all(count > 0 for count in claimed.per_worker)  # the work was shared
    assert unclaimed.loads > claimed.loads


async def test_claims_of_a_killed_worker_are_taken_over_after_the_lease(url: str) -> None:
    definition = flaky_saga(RETRIES)
    clock = FakeClock()
    async with sql_store(url) as store:
        survivor = Orchestrator(store=store, definitions=[definition], clock=clock)
        saga_ids = [f"flaky-{n}" for n in range(10)]
        for saga_id in saga_ids:
            await survivor.start(definition.name, {}, saga_id=saga_id)
        clock.advance(1)

        # Worker "a" claims every due saga, then dies before firing any.
        lease = timedelta(seconds=0.5)
        taken = await store.claim_due(clock.now(), 100, owner="a", lease=lease)
        assert sorted(saga.saga_id for saga in taken) == saga_ids

        assert await survivor.fire_due(owner="b") == 0  # held by "a"
        clock.advance(0.4)
        assert await survivor.fire_due(owner="b") == 0
        clock.advance(0.1)
        assert await survivor.fire_due(owner="b") == len(saga_ids)  # the lease has passed
        assert await survivor.fire_due(owner="b") == 0

        for saga_id in saga_ids:
            history = await store.history(saga_id)
            assert [entry.input for entry in history if entry.outcome == "applied"] == [
                "Start",
                "Timeout",
            ]


@pytest.mark.postgres
async def test_real_timeout_services_take_over_a_dead_workers_claims(postgres_url: str) -> None:
    """Real time, real services: a deadline held by a dead worker fires once, after the lease."""
    definition = (
        SagaBuilder("quick", data=Tally)
        .step("call")
        .send(Bump, to="counter")
        .timeout(seconds=0.2)
        .build()
    )
    clock = SystemClock()
    prefix = unique_prefix()
    saga_ids = [f"quick-{n}" for n in range(10)]
    async with sql_store(postgres_url, prefix=prefix) as store:
        starter = Orchestrator(store=store, definitions=[definition], clock=clock)
        for saga_id in saga_ids:
            await starter.start(definition.name, {}, saga_id=saga_id)
        await asyncio.sleep(0.25)

        # The dead worker's last act: claim every due saga for 0.5 s.
        claimed_at = clock.now()
        lease = timedelta(seconds=0.5)
        taken = await store.claim_due(claimed_at, 100, owner="dead", lease=lease)
        assert sorted(saga.saga_id for saga in taken) == saga_ids

        stores = [SqlSagaStore.from_url(postgres_url, table_prefix=prefix) for _ in range(WORKERS)]
        services = [
            TimeoutService(
                Orchestrator(store=worker_store, definitions=[definition], clock=clock),
                interval=0.02,
                lease=1.0,
            )
            for worker_store in stores
        ]
        tasks = [asyncio.create_task(service.run()) for service in services]
        try:
            deadline = time.monotonic() + 10
            while sum(service.fired for service in services) < len(saga_ids):
                assert time.monotonic() < deadline, "the dead worker's deadlines never fired"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)  # time for a double fire to show, if there were one
        finally:
            for service in services:
                service.stop()
            await asyncio.gather(*tasks)
            for worker_store in stores:
                await worker_store.close()

        assert len({service.owner for service in services}) == WORKERS
        assert sum(service.fired for service in services) == len(saga_ids)
        assert sum(service.orchestrator.conflicts for service in services) == 0
        for saga_id in saga_ids:
            saga = await store.load(saga_id)
            assert saga is not None
            assert saga.status is not SagaStatus.RUNNING
            timeouts = [
                entry
                for entry in await store.history(saga_id)
                if entry.outcome == "applied" and entry.input == "Timeout"
            ]
            assert len(timeouts) == 1
            assert timeouts[0].at >= claimed_at + lease  # not before the dead worker's lease
