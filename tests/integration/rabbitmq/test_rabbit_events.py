"""Event-started sagas over the real broker and PostgreSQL: events published by another service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from pydantic import BaseModel

from sagas_abstractions import Envelope, RouteKind, SagaStatus
from sagas_core import Participant, SagaBuilder, SagaRuntime, event_envelope
from sagas_core.codec import HEADER_REASON
from sagas_rabbitmq import RabbitBus
from sagas_sqlalchemy import SqlSagaStore
from tests.waiting import eventually, saga_reaches

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]


class ItemAdded(BaseModel):
    cart_id: str
    line_id: str
    sku: str


class ItemRemoved(BaseModel):
    cart_id: str
    line_id: str


class OrderCompleted(BaseModel):
    cart_id: str
    order_id: str
    line_ids: list[str]


class Line(BaseModel):
    cart_id: str
    line_id: str
    sku: str
    order_id: str | None = None


class Reserve(BaseModel):
    sku: str


class Release(BaseModel):
    sku: str


class Commit(BaseModel):
    sku: str
    order_id: str


def _line(event: ItemAdded | ItemRemoved) -> str:
    return f"{event.cart_id}:{event.line_id}"


SAGA = (
    SagaBuilder("rabbit-reservation", data=Line)
    .starts_on(ItemAdded, saga_id=_line)
    .cancel_on(ItemRemoved, saga_id=_line)
    .step("reserve")
    .send(Reserve, to="stock")
    .compensate_with(Release)
    .step("await-order")
    .wait_for(
        OrderCompleted,
        saga_id=lambda e: [f"{e.cart_id}:{line}" for line in e.line_ids],
        missing="dead-letter",
    )
    .timeout(seconds=60)
    .step("commit")
    .send(Commit, to="stock")
    .build()
)


class Stock:
    def __init__(self) -> None:
        self.effects: list[tuple[str, str]] = []

    def participant(self) -> Participant:
        participant = Participant("stock")

        @participant.handles(Reserve)
        async def reserve(cmd: Reserve) -> None:
            self.effects.append(("reserve", cmd.sku))

        @participant.handles(Release)
        async def release(cmd: Release) -> None:
            self.effects.append(("release", cmd.sku))

        @participant.handles(Commit)
        async def commit(cmd: Commit) -> None:
            self.effects.append(("commit", cmd.sku))

        return participant


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    store = SqlSagaStore.from_url(
        postgres_url, table_prefix=f"ev{uuid.uuid4().hex[:8]}_", create_tables=True
    )
    try:
        yield store
    finally:
        await store.drop_tables()
        await store.close()


async def _settled(runtime: SagaRuntime, saga_id: str, status: SagaStatus) -> None:
    await saga_reaches(runtime.orchestrator.store, saga_id, status)


async def test_events_from_another_service_start_advance_and_cancel_sagas(
    connect: BusFactory, store: SqlSagaStore
) -> None:
    stock = Stock()
    await stock.participant().attach(await connect(group="stock"), concurrency=4)
    publisher = await connect(group="cart-service")  # the service that owns the events
    dead: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        dead.append(envelope)

    runtime = SagaRuntime(sagas=[SAGA], store=store, bus=await connect(), timeout_interval=0.05)
    await runtime.start()
    watcher = await publisher.subscribe(RouteKind.DEAD_LETTER, "dead-letter", collect)
    try:
        added = ItemAdded(cart_id="c1", line_id="1", sku="A")
        await publisher.publish([event_envelope(added, message_id="cart-1")])
        await publisher.publish([event_envelope(added, message_id="cart-1")])  # duplicate
        await publisher.publish(
            [event_envelope(ItemAdded(cart_id="c1", line_id="2", sku="B"), message_id="cart-2")]
        )
        await _settled(runtime, "c1:1", SagaStatus.RUNNING)
        # The removal travels on its own topic's queue, so it can overtake line 2's start and
        # meet no saga (the missing-saga policy ignores it). Wait for the saga it cancels.
        await _settled(runtime, "c1:2", SagaStatus.RUNNING)
        await publisher.publish(
            [event_envelope(ItemRemoved(cart_id="c1", line_id="2"), message_id="cart-3")]
        )
        await _settled(runtime, "c1:2", SagaStatus.COMPENSATED)
        await publisher.publish(
            [
                event_envelope(
                    OrderCompleted(cart_id="c1", order_id="o-1", line_ids=["1", "7"]),
                    message_id="order-1",
                )
            ]
        )
        await _settled(runtime, "c1:1", SagaStatus.COMPLETED)
        bad = event_envelope(added, message_id="cart-bad").model_copy(
            update={"body": b'{"cart_id": "c1"}'}
        )
        await publisher.publish([bad])
        await eventually(lambda: len(dead) >= 2, what="two dead letters")
        sagas = await store.find(saga_type="rabbit-reservation")
        line_1 = await store.load("c1:1")
    finally:
        await watcher.close()
        await runtime.stop(grace=5)

    assert sorted(saga.saga_id for saga in sagas) == ["c1:1", "c1:2"]  # the duplicate: no third
    assert line_1 is not None
    assert line_1.data["order_id"] == "o-1"
    assert sorted(stock.effects) == sorted(
        [("reserve", "A"), ("reserve", "B"), ("release", "B"), ("commit", "A")]
    )
    reasons = sorted(letter.headers[HEADER_REASON] for letter in dead)
    assert any("c1:7, which does not exist" in reason for reason in reasons)
    assert any("line_id" in reason and "ItemAdded" in reason for reason in reasons)
    assert {letter.message_id for letter in dead} == {"order-1", "cart-bad"}
