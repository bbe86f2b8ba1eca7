"""Orchestrators racing on one saga through separate engines on one database.

Each racer has its own store, hence its own connection pool: what several worker processes
would do. Every input is delivered to every racer at once (competing consumers with
redeliveries). Optimistic concurrency and the inbox must make the outcome exactly the serial
one: no lost update, no transition applied twice, one applied history row per version.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from sagas_abstractions import HistoryEntry, SagaInstance, SagaStatus
from sagas_core import Orchestrator
from sagas_core.definition import SagaDefinition
from sagas_core.testing import FakeClock, InMemorySagaStore
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import (
    flaky_saga,
    long_saga,
    sql_store,
    sqlite_url,
    success_for,
    tokenless,
    unique_prefix,
)

pytestmark = pytest.mark.integration

RACERS = 3
STEPS = 60
SAGAS = 3
RETRIES = 15


class SlowLoadStore(SqlSagaStore):
    """Yields after each load so the racers all decide on the same version before saving."""

    async def load(self, saga_id: str) -> SagaInstance | None:
        instance = await super().load(saga_id)
        await asyncio.sleep(0.001)
        return instance


def assert_one_applied_row_per_version(history: list[HistoryEntry], final: SagaInstance) -> None:
    applied = Counter(entry.version for entry in history if entry.outcome == "applied")
    assert applied == Counter(range(1, final.version + 1))


async def serial_result(
    definition: SagaDefinition, drive: str, saga_ids: list[str]
) -> tuple[InMemorySagaStore, list[SagaInstance]]:
    """The same inputs applied by one orchestrator on the in-memory store."""
    store = InMemorySagaStore()
    clock = FakeClock()
    orchestrator = Orchestrator(store=store, definitions=[definition], clock=clock)
    for saga_id in saga_ids:
        await orchestrator.start(definition.name, {}, saga_id=saga_id)
    if drive == "replies":
        for _ in range(STEPS):
            saga = await store.load(saga_ids[0])
            assert saga is not None
            await orchestrator.handle_reply(success_for(saga))
    else:
        for _ in range(2 * RETRIES + 2):
            clock.advance(1)
            await orchestrator.fire_due()
    return store, [saga for saga_id in saga_ids if (saga := await store.load(saga_id))]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield cast("str", request.getfixturevalue("postgres_url"))


async def test_racing_orchestrators_apply_every_reply_exactly_once(url: str) -> None:
    definition = long_saga(STEPS)
    clock = FakeClock()
    prefix = unique_prefix()
    async with sql_store(url, prefix=prefix) as owner:
        racers = [SlowLoadStore.from_url(url, table_prefix=prefix) for _ in range(RACERS)]
        try:
            orchestrators = [
                Orchestrator(store=store, definitions=[definition], clock=clock) for store in racers
            ]
            await orchestrators[0].start("long", {}, saga_id="race-1")

            for _ in range(STEPS):
                saga = await owner.load("race-1")
                assert saga is not None
                reply = success_for(saga)
                decisions = await asyncio.gather(
                    *(orchestrator.handle_reply(reply) for orchestrator in orchestrators)
                )
                assert sum(decision is not None for decision in decisions) == 1
        finally:
            for store in racers:
                await store.close()

        final = await owner.load("race-1")
        assert final is not None
        serial_store, [serial] = await serial_result(definition, "replies", ["race-1"])
        assert tokenless(final) == tokenless(serial)
        assert final.status is SagaStatus.COMPLETED
        assert final.data == {"count": STEPS, "trail": "".join(f"{n}," for n in range(STEPS))}
        assert_one_applied_row_per_version(await owner.history("race-1"), final)
        assert await owner.pending_count() == await serial_store.pending_count()
        assert sum(orchestrator.conflicts for orchestrator in orchestrators) > 0


@pytest.mark.postgres
async def test_racing_timeout_services_fire_every_deadline_exactly_once(postgres_url: str) -> None:
    definition = flaky_saga(RETRIES)
    clock = FakeClock()
    prefix = unique_prefix()
    saga_ids = [f"flaky-{n}" for n in range(SAGAS)]
    async with sql_store(postgres_url, prefix=prefix) as owner:
        racers = [SlowLoadStore.from_url(postgres_url, table_prefix=prefix) for _ in range(RACERS)]
        try:
            orchestrators = [
                Orchestrator(store=store, definitions=[definition], clock=clock) for store in racers
            ]
            for saga_id in saga_ids:
                await orchestrators[0].start("flaky", {}, saga_id=saga_id)
            fired = 0
            for _ in range(2 * RETRIES + 2):
                clock.advance(1)
                counts = await asyncio.gather(
                    *(orchestrator.fire_due() for orchestrator in orchestrators)
                )
                fired += sum(counts)
        finally:
            for store in racers:
                await store.close()

        serial_store, serial = await serial_result(definition, "deadlines", saga_ids)
        finals: list[SagaInstance] = [
            saga for saga_id in saga_ids if (saga := await owner.load(saga_id))
        ]
        assert tokenless(*finals) == tokenless(*serial)
        assert fired == sum(saga.version - 1 for saga in serial)
        for final in finals:
            assert not final.status.is_active
            assert_one_applied_row_per_version(await owner.history(final.saga_id), final)
        assert await owner.pending_count() == await serial_store.pending_count()
