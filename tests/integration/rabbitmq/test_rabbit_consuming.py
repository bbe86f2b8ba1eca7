"""Consuming on the aiormq channel: acks written together, none lost; the consumer comes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika
import aio_pika.exceptions
import aiormq
import pytest

from sagas_abstractions import Envelope, PublishError, RouteKind
from sagas_rabbitmq import RabbitBus, RabbitSubscription, _aiormq
from tests.integration.rabbitmq.test_rabbit_bus import WAIT, _ready_messages, envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]


async def test_the_acks_of_a_burst_go_out_together_and_every_message_is_acked(
    bus: RabbitBus, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    original = _aiormq._write_acks

    async def counting(channel: aiormq.Channel, tags: list[int]) -> None:
        writes.append(len(tags))
        await original(channel, tags)

    monkeypatch.setattr(_aiormq, "_write_acks", counting)
    handled: list[str] = []

    async def record(message: Envelope) -> None:
        handled.append(message.message_id)

    batch = [envelope(RouteKind.COMMAND, "inventory") for _ in range(40)]
    await bus.publish(batch)  # waiting in the queue: the broker delivers a prefetch at once

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", record, concurrency=16)

    await eventually(lambda: subscription.handled == 40)
    await bus.close()
    assert sorted(handled) == sorted(m.message_id for m in batch)
    assert sum(writes) == 40
    assert len(writes) < 40
    assert await _ready_messages(amqp_url, subscription.queue_name) == 0


async def test_an_ack_on_a_channel_that_closed_is_dropped_and_the_message_redelivered(
    bus: RabbitBus, amqp_url: str
) -> None:
    seen: list[str] = []

    async def close_the_channel_once(message: Envelope) -> None:
        seen.append(message.message_id)
        if len(seen) == 1:
            underlay = await subscription._channel.get_underlay_channel()
            await underlay.close()

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", close_the_channel_once)
    command = envelope(RouteKind.COMMAND, "inventory")

    await bus.publish([command])

    await eventually(lambda: len(seen) == 2)
    assert seen == [command.message_id, command.message_id]
    await eventually(lambda: subscription.handled == 1)
    await bus.close()
    assert await _ready_messages(amqp_url, subscription.queue_name) == 0


async def test_a_subscription_consumes_again_after_its_channel_reopens(bus: RabbitBus) -> None:
    subscription, received = await _recording(bus)
    first = await subscription._channel.get_underlay_channel()
    tag = subscription._consumer.tag

    await first.close()

    async def consuming_on_a_new_channel() -> bool:
        underlay = await subscription._channel.get_underlay_channel()
        return underlay is not first and await subscription.is_consuming()

    async with asyncio.timeout(WAIT):
        while not await consuming_on_a_new_channel():
            await asyncio.sleep(0.05)
    assert subscription._consumer.tag == tag
    command = envelope(RouteKind.COMMAND, "inventory")
    await bus.publish([command])
    await eventually(lambda: received == [command.message_id])


async def test_a_consumer_the_broker_cancels_comes_back_when_its_queue_is_deleted(
    bus: RabbitBus, amqp_url: str
) -> None:
    subscription, received = await _recording(bus)
    connection = await aio_pika.connect(amqp_url, timeout=WAIT)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(subscription.queue_name)  # the broker cancels the consumer

    async with asyncio.timeout(WAIT):
        while not (
            await subscription.is_consuming() and await _queue_exists(amqp_url, subscription)
        ):
            await asyncio.sleep(0.05)
    command = envelope(RouteKind.COMMAND, "inventory")
    for _ in range(2):  # the first may be returned: the bus thinks the queue is still there
        with contextlib.suppress(PublishError):
            await bus.publish([command])
    await eventually(lambda: command.message_id in received)


async def _recording(bus: RabbitBus) -> tuple[RabbitSubscription, list[str]]:
    received: list[str] = []

    async def record(message: Envelope) -> None:
        received.append(message.message_id)

    return await bus.subscribe(RouteKind.COMMAND, "inventory", record), received


async def _queue_exists(amqp_url: str, subscription: RabbitSubscription) -> bool:
    try:
        await _ready_messages(amqp_url, subscription.queue_name)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def test_without_the_aiormq_internals_each_message_is_acked_on_its_own(
    bus: RabbitBus, amqp_url: str
) -> None:
    subscription, received = await _recording(bus)
    subscription._acks = None  # what the bus decides on connect for an aiormq without them
    batch = [envelope(RouteKind.COMMAND, "inventory") for _ in range(5)]

    await bus.publish(batch)

    await eventually(lambda: subscription.handled == 5)
    await bus.close()
    assert sorted(received) == sorted(m.message_id for m in batch)
    assert not _aiormq.supports_ack_writer(object())
    assert await _ready_messages(amqp_url, subscription.queue_name) == 0
