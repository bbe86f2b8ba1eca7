"""Issue 18, defect 8, over the real RabbitMQ and PostgreSQL: forged replies are not applied.

A participant of another destination (it may publish to the replies exchange, like every
participant, but cannot read the shipping queue) publishes replies for the shipping step under
the predictable id ``<saga>:create-shipment:execute:1:reply``: a ``succeeded`` with its own data
and a ``failed``. Neither completes nor compensates the saga; both are recorded in its history
and dead-lettered with a reason; the genuine shipping reply, arriving after them under the same
id, completes the saga.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from pydantic import BaseModel

from sagas_abstractions import Envelope, RouteKind, SagaStatus
from sagas_core import Participant, SagaBuilder, SagaRuntime
from sagas_core.codec import HEADER_REASON, HEADER_REPLY_TOKEN
from sagas_rabbitmq.testing import rabbitmqctl
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.conftest import DELIVERY_LIMIT, BusFactory
from tests.integration.rabbitmq.hardening import (
    Release,
    Reserve,
    inventory,
    publish_reply,
)
from tests.waiting import eventually, saga_reaches

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres]


class Order(BaseModel):
    order_id: str
    reservation_id: str | None = None
    shipment_id: str | None = None


class CreateShipment(BaseModel):
    order_id: str


order_saga = (
    SagaBuilder("forged-replies", data=Order)
    .step("reserve")
    .send(Reserve, to="inventory")
    .compensate_with(Release)
    .step("create-shipment")
    .send(CreateShipment, to="shipping")
    .build()
)


def shipping(shipped: list[str]) -> Participant:
    participant = Participant("shipping")

    @participant.handles(CreateShipment)
    async def ship(cmd: CreateShipment) -> dict[str, str]:
        shipped.append(cmd.order_id)
        return {"shipment_id": f"SH-{cmd.order_id}"}

    return participant


@contextlib.asynccontextmanager
async def order_runtime(
    connect: BusFactory, store: SqlSagaStore, **options: Any
) -> AsyncIterator[tuple[SagaRuntime, list[Envelope], list[str]]]:
    """The order saga's runtime with inventory up (shipping is the test's), started; with the
    dead letters it sees and the reservations inventory released."""
    released: list[str] = []
    dead: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        dead.append(envelope)

    runtime = SagaRuntime(
        sagas=[order_saga],
        participants=[inventory(released)],
        store=store,
        bus=await connect(),
        timeout_interval=0.05,
        relay_poll_interval=0.1,
        **options,
    )
    await runtime.start()
    watcher = await runtime.bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", collect)
    try:
        yield runtime, dead, released
    finally:
        await watcher.close()
        await runtime.stop(grace=5)


async def forge(
    amqp_url: str, prefix: str, reply_to: str, saga_id: str, body: dict[str, object]
) -> None:
    """Publish what the forger of the issue published, with a guessed token."""
    await publish_reply(
        amqp_url,
        prefix,
        reply_to,
        saga_type="forged-replies",
        saga_id=saga_id,
        step="create-shipment",
        body=json.dumps(body).encode(),
        token="a-guess",
    )


async def test_forged_replies_for_another_step_neither_complete_nor_compensate_the_saga(
    connect: BusFactory, store: SqlSagaStore, amqp_url: str, prefix: str
) -> None:
    shipped: list[str] = []
    # Shipping is not up yet: its command waits in its queue while the forger strikes.
    async with order_runtime(connect, store) as (runtime, dead, released):
        saga = await runtime.start_saga(order_saga, Order(order_id="o-1"))
        await saga_reaches(store, saga.saga_id, SagaStatus.RUNNING, step="create-shipment")

        reply_to = runtime.orchestrator.reply_to
        await forge(
            amqp_url,
            prefix,
            reply_to,
            saga.saga_id,
            {"status": "succeeded", "data": {"shipment_id": "FORGED"}},
        )
        await forge(
            amqp_url,
            prefix,
            reply_to,
            saga.saga_id,
            {"status": "failed", "data": {}, "error": {"code": "forged", "retryable": False}},
        )
        await eventually(lambda: len(dead) >= 2, what="both forged replies dead-lettered")
        forged_at = await store.load(saga.saga_id)
        history = await runtime.orchestrator.history(saga.saga_id)

        shipping_bus = await connect()
        await shipping(shipped).attach(shipping_bus)
        done = await runtime.wait_for(saga.saga_id, timeout=30)

    assert forged_at is not None
    assert forged_at.status is SagaStatus.RUNNING
    assert forged_at.data["shipment_id"] is None
    rejected = [row for row in history if row.outcome == "rejected"]
    assert sorted(row.input for row in rejected) == ["StepFailed", "StepSucceeded"]
    assert all(row.step == "create-shipment" for row in rejected)
    for letter in dead:
        assert letter.message_id == f"{saga.saga_id}:create-shipment:execute:1:reply"
        assert "reply token" in letter.headers[HEADER_REASON]
        assert HEADER_REPLY_TOKEN not in letter.headers
    # The genuine reply had the forged replies' id, and was applied all the same.
    assert done.status is SagaStatus.COMPLETED
    assert done.data["shipment_id"] == "SH-o-1"
    assert shipped == ["o-1"]
    assert released == []


def queue_arguments(prefix: str) -> dict[str, str | int]:
    """The work queue arguments of docs/protocol.md, section 1."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": f"{prefix}.dead-letter",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def broker_user(amqp_url: str, configure: str, write: str, read: str) -> Iterator[str]:
    """A broker user of its own with these permissions, for the test's duration; its URL."""
    name, password = f"sagas-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", name, password)
    try:
        vhost = urlsplit(amqp_url).path.lstrip("/") or "/"
        rabbitmqctl("set_permissions", "-p", vhost, name, configure, write, read)
        parts = urlsplit(amqp_url)
        yield urlunsplit(
            parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port or 5672}")
        )
    finally:
        rabbitmqctl("delete_user", name)


@pytest.fixture
def shipping_user(amqp_url: str, prefix: str, needs_rabbitmqctl: None) -> Iterator[str]:
    """A broker user with the permissions docs/protocol.md (section 8) gives ``shipping``."""
    escaped = prefix.replace(".", r"\.")
    yield from broker_user(
        amqp_url,
        rf"^{escaped}\.commands\.shipping$",
        rf"^{escaped}\.(commands\.shipping|replies|dead-letter)$",
        rf"^{escaped}\.commands(\.shipping)?$",
    )


async def test_the_documented_permissions_let_a_participant_serve_only_its_own_queue(
    connect: BusFactory, amqp_url: str, prefix: str, shipping_user: str
) -> None:
    orchestrator = await connect()  # declares the exchanges and the dead-letter queue
    received: list[Envelope] = []

    async def receive(envelope: Envelope) -> None:
        received.append(envelope)

    await orchestrator.subscribe(RouteKind.REPLY, "probe", receive)
    arguments: dict[str, Any] = dict(queue_arguments(prefix))
    admin = await aio_pika.connect(amqp_url)
    connection = await aio_pika.connect(shipping_user)
    try:
        inventory_queue = f"{prefix}.commands.inventory"
        await (await admin.channel()).declare_queue(
            inventory_queue, durable=True, arguments=arguments
        )

        async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"{prefix}.commands.shipping", durable=True, arguments=arguments
        )
        await queue.bind(f"{prefix}.commands", routing_key="shipping")
        await queue.consume(ack)
        for exchange in ("replies", "dead-letter"):
            target = await channel.get_exchange(f"{prefix}.{exchange}", ensure=False)
            await target.publish(
                aio_pika.Message(
                    b"{}",
                    message_id=f"probe-{exchange}",
                    user_id=urlsplit(shipping_user).username,
                ),
                routing_key="probe",
            )
        # The orchestrator reads the user id the broker validated.
        (reply,) = await eventually(lambda: received, what="the probe reply")
        assert reply.user_id == urlsplit(shipping_user).username

        # Another destination's commands, and so their reply tokens, are out of reach.
        other = await connection.channel()
        probe = await other.get_queue(inventory_queue, ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):
            await probe.consume(ack)
        # And the broker refuses a user id that is not the connection's own.
        liar = await connection.channel(publisher_confirms=True)
        replies = await liar.get_exchange(f"{prefix}.replies", ensure=False)
        with pytest.raises(aio_pika.exceptions.ChannelClosed, match="PRECONDITION_FAILED"):
            await replies.publish(
                aio_pika.Message(b"{}", message_id="probe-liar", user_id="guest"),
                routing_key="nobody",
            )
    finally:
        await connection.close()
        cleanup = await admin.channel()
        for name in (f"{prefix}.commands.inventory", f"{prefix}.commands.shipping"):
            await cleanup.queue_delete(name)
        await admin.close()


@pytest.fixture
def service_user(amqp_url: str, prefix: str, needs_rabbitmqctl: None) -> Iterator[str]:
    """A broker user of its own, allowed everything under the test's prefix; its URL."""
    everything = rf"^{re.escape(prefix)}\."
    yield from broker_user(amqp_url, everything, everything, everything)


@pytest.mark.parametrize("answered_as", ["its own user", "another user"])
async def test_a_python_participant_stamps_its_broker_user_on_replies_and_only_that_user_counts(
    connect: BusFactory, store: SqlSagaStore, service_user: str, answered_as: str
) -> None:
    shipping_name = urlsplit(service_user).username
    assert shipping_name is not None
    shipped: list[str] = []
    runtime_options = {"reply_users": {"shipping": shipping_name}}
    async with order_runtime(connect, store, **runtime_options) as (runtime, dead, _):
        # The genuine service connects as its own user; a stand-in as guest, the orchestrator's.
        shipping_bus = (
            await connect(url=service_user) if answered_as == "its own user" else await connect()
        )
        await shipping(shipped).attach(shipping_bus)
        saga = await runtime.start_saga(order_saga, Order(order_id="o-1"))
        if answered_as == "its own user":
            done = await runtime.wait_for(saga.saga_id, timeout=30)
            assert done.status is SagaStatus.COMPLETED
            assert done.data["shipment_id"] == "SH-o-1"
        else:
            (letter,) = await eventually(lambda: dead, what="the stand-in's reply dead-lettered")
            assert f"not by {shipping_name!r}" in letter.headers[HEADER_REASON]
            still = await store.load(saga.saga_id)
            assert still is not None
            assert still.status is SagaStatus.RUNNING
            assert still.data["shipment_id"] is None
    assert shipped == ["o-1"]
