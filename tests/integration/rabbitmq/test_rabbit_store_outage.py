"""A database outage under load costs time, not messages: on the real broker and PostgreSQL.

While the database refuses connections, the replies that arrive are the same genuine replies
they will be a few seconds later. Failing them is the worker's failure, not theirs, so it must
not use up their delivery limit: the worker holds them and waits for the database, then every
saga goes on from where it was, none dead-lettered and none rescued by its step timeout.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from sagas_abstractions import Envelope, RouteKind, SagaStatus, StoreError
from sagas_core import Participant, SagaBuilder, SagaRuntime
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.conftest import BusFactory
from tests.waiting import eventually, saga_reaches

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.slow]

SAGAS = 30
OUTAGE_SECONDS = 4.0
"""How long the database refuses connections (the fault's length, not a synchronisation)."""


class Parcel(BaseModel):
    parcel_id: str


class Pick(BaseModel):
    parcel_id: str


class Pack(BaseModel):
    parcel_id: str


class Ship(BaseModel):
    parcel_id: str


# Step timeouts far longer than the outage: a saga that needed one was rescued by it.
parcel_saga = (
    SagaBuilder("outage-parcels", data=Parcel)
    .step("pick")
    .send(Pick, to="outage-picking")
    .timeout(seconds=25)
    .step("pack")
    .send(Pack, to="outage-packing")
    .timeout(seconds=25)
    .step("ship")
    .send(Ship, to="outage-shipping")
    .timeout(seconds=25)
    .build()
)


def _participants(outage_begun: asyncio.Event) -> list[Participant]:
    picking, packing, shipping = (
        Participant("outage-picking"),
        Participant("outage-packing"),
        Participant("outage-shipping"),
    )

    @picking.handles(Pick)
    async def pick(cmd: Pick) -> None:
        await outage_begun.wait()  # every first reply arrives while the database is down

    @packing.handles(Pack)
    async def pack(cmd: Pack) -> None:
        return None

    @shipping.handles(Ship)
    async def ship(cmd: Ship) -> None:
        return None

    return [picking, packing, shipping]


class Database:
    """A database of this test only, which the test can make refuse every connection."""

    def __init__(self, server_url: str) -> None:
        url = make_url(server_url)
        self.name = f"sagas_outage_{uuid.uuid4().hex[:8]}"
        self.url = url.set(database=self.name).render_as_string(hide_password=False)
        admin = url.set(drivername="postgresql")
        self._admin = admin.render_as_string(hide_password=False)

    async def _run(self, *statements: sql.Composed) -> None:
        async with await psycopg.AsyncConnection.connect(self._admin, autocommit=True) as conn:
            for statement in statements:
                await conn.execute(statement)

    async def create(self) -> None:
        await self._run(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    async def refuse_connections(self) -> None:
        """Refuse new connections (superusers included) and end the open ones."""
        await self._run(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(self.name)),
            sql.SQL(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = {} AND pid <> pg_backend_pid()"
            ).format(sql.Literal(self.name)),
        )

    async def accept_connections(self) -> None:
        await self._run(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(self.name))
        )

    async def drop(self) -> None:
        await self._run(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
        )


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(postgres_url)
    await database.create()
    try:
        yield database
    finally:
        await database.drop()


async def test_a_database_outage_under_load_dead_letters_nothing_and_needs_no_step_timeout(
    connect: BusFactory, database: Database
) -> None:
    store = SqlSagaStore.from_url(database.url, create_tables=True)
    participant_bus = await connect(group="participants")
    outage_begun = asyncio.Event()
    for participant in _participants(outage_begun):
        await participant.attach(participant_bus, concurrency=8)
    dead: list[Envelope] = []

    async def record(envelope: Envelope) -> None:
        dead.append(envelope)

    await participant_bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", record)
    refused: list[str] = []
    try:
        async with SagaRuntime(
            sagas=[parcel_saga],
            bus=await connect(),
            store=store,
            timeout_interval=0.2,
            relay_poll_interval=0.2,
        ) as runtime:
            handle = runtime.orchestrator.handle_envelope

            async def noting_refusals(envelope: Envelope) -> None:
                try:
                    await handle(envelope)
                except StoreError:
                    refused.append(envelope.message_id)
                    raise

            runtime.orchestrator.handle_envelope = noting_refusals  # type: ignore[method-assign]
            started = [
                await runtime.start_saga(parcel_saga, Parcel(parcel_id=f"P-{n}"))
                for n in range(SAGAS)
            ]

            await database.refuse_connections()
            outage_begun.set()
            try:
                await eventually(lambda: refused, what="a reply meeting the outage")
                await asyncio.sleep(OUTAGE_SECONDS)
            finally:
                await database.accept_connections()

            finished = [
                await saga_reaches(store, saga.saga_id, SagaStatus.COMPLETED, timeout=60)
                for saga in started
            ]
            histories = [await store.history(saga.saga_id) for saga in finished]
    finally:
        await store.close()

    assert [d.message_id for d in dead] == []
    timed_out = [e.saga_id for h in histories for e in h if e.input == "Timeout"]
    assert timed_out == []
    assert refused  # the outage met replies in flight
