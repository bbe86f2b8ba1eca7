"""RabbitBus writes a batch at once (one write, one confirm per message): its failure paths.

The batch path registers its confirmations on aiormq's channel itself, so these tests check,
against the real broker, that every way a message can fail is still reported for that message:
returned as unroutable, lost with the channel or the connection, or not confirmed in time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiormq
import pytest

from sagas_abstractions import Envelope, PublishError, RouteKind
from sagas_rabbitmq import RabbitBus, _aiormq
from tests.integration.rabbitmq.test_rabbit_bus import envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]


async def _underlay(bus: RabbitBus) -> aiormq.Channel:
    channel = bus._publish_channel
    assert channel is not None
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    return underlay


async def _collect(bus: RabbitBus, destination: str) -> list[Envelope]:
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    await bus.subscribe(RouteKind.COMMAND, destination, record, concurrency=16)
    return received


def _commands(count: int, destination: str = "inventory") -> list[Envelope]:
    return [envelope(RouteKind.COMMAND, destination) for _ in range(count)]


async def test_the_installed_aiormq_takes_the_batch_path_not_basic_publish(
    bus: RabbitBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = await _collect(bus, "inventory")
    underlay = await _underlay(bus)

    async def not_this_path(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("basic_publish was called: the batch path was not taken")

    monkeypatch.setattr(underlay, "basic_publish", not_this_path)
    batch = _commands(3)

    await bus.publish(batch)

    assert bus.batch_publishing
    await eventually(lambda: len(received) == 3)
    assert [m.message_id for m in received] == [m.message_id for m in batch]


async def test_without_the_aiormq_internals_it_publishes_one_message_at_a_time(
    bus: RabbitBus,
) -> None:
    received = await _collect(bus, "inventory")
    bus._batch_publishing = False
    batch = _commands(3)

    await bus.publish(batch)

    assert not _aiormq.supports_batch_publish(object())
    await eventually(lambda: len(received) == 3)
    assert sorted(m.message_id for m in received) == sorted(m.message_id for m in batch)


async def test_an_empty_batch_writes_nothing(
    bus: RabbitBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_write(*args: Any) -> None:
        raise AssertionError("an empty batch was written")

    monkeypatch.setattr(_aiormq, "_write_batch", no_write)

    await bus.publish([])


async def test_unroutable_messages_in_a_batch_are_named_and_the_others_arrive(
    bus: RabbitBus,
) -> None:
    received = await _collect(bus, "inventory")
    good = _commands(3)
    lost = [envelope(RouteKind.REPLY, "nobody-listens-here") for _ in range(2)]

    with pytest.raises(PublishError, match="unroutable") as raised:
        await bus.publish([good[0], lost[0], good[1], lost[1], good[2]])

    assert lost[0].message_id in str(raised.value)
    assert raised.value.__notes__ == ["1 more of the 5 envelopes failed"]
    await eventually(lambda: len(received) == 3)
    assert [m.message_id for m in received] == [m.message_id for m in good]
    # The channel is still usable and its bookkeeping is clean.
    await bus.publish(_commands(2))
    await eventually(lambda: len(received) == 5)
    underlay = await _underlay(bus)
    assert underlay.message_id_delivery_tag == {}


async def _publish_losing_the_channel_after_the_write(
    bus: RabbitBus,
    batch: Sequence[Envelope],
    monkeypatch: pytest.MonkeyPatch,
    lose: Callable[[aiormq.Channel], Awaitable[None]],
) -> PublishError:
    original = _aiormq._write_batch
    written: list[aiormq.Channel] = []

    async def write_then_lose(
        channel: aiormq.Channel, messages: Sequence[Any]
    ) -> list[asyncio.Future[Any]]:
        # The broker's confirms are not heard: the channel goes while all are outstanding.
        patch.setattr(channel, "_on_confirm_frame", _ignore)
        confirmations = await original(channel, messages)
        written.append(channel)
        await lose(channel)
        return confirmations

    with monkeypatch.context() as patch:
        patch.setattr(_aiormq, "_write_batch", write_then_lose)
        with pytest.raises(PublishError) as raised:
            await bus.publish(batch)
    assert written, "the batch was not written"
    return raised.value


async def _ignore(frame: object) -> None:
    return None


async def _close_channel(channel: aiormq.Channel) -> None:
    await channel.close()


async def _close_connection(channel: aiormq.Channel) -> None:
    await channel.connection.close(ConnectionError("test: the connection dropped"))


@pytest.mark.parametrize("lose", [_close_channel, _close_connection], ids=["channel", "connection"])
async def test_losing_the_channel_mid_batch_raises_and_a_retry_delivers_everything(
    connect: BusFactory,
    monkeypatch: pytest.MonkeyPatch,
    lose: Callable[[aiormq.Channel], Awaitable[None]],
) -> None:
    consumer_bus = await connect()
    received = await _collect(consumer_bus, "inventory")
    bus = await connect()
    await bus.publish(_commands(1, "inventory"))  # declares the queue and warms the channel
    await eventually(lambda: len(received) == 1)
    batch = _commands(200)

    error = await _publish_losing_the_channel_after_the_write(bus, batch, monkeypatch, lose)

    assert error.saga_id == "saga-1"
    async with asyncio.timeout(10):
        while True:  # the robust connection reopens the channel; retry as the relay would
            try:
                await bus.publish(batch)
                break
            except PublishError:
                await asyncio.sleep(0.1)
    wanted = {m.message_id for m in batch}
    await eventually(lambda: wanted <= {m.message_id for m in received}, timeout=10)


async def test_confirms_that_do_not_come_in_time_raise_publish_error(
    connect: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = await connect(publish_timeout=0.3)
    await bus.publish(_commands(1))
    underlay = await _underlay(bus)

    batch = _commands(3)
    with monkeypatch.context() as patch:
        patch.setattr(underlay, "_on_confirm_frame", _ignore)
        with pytest.raises(PublishError, match="not confirmed in time") as raised:
            await bus.publish(batch)

    assert batch[0].message_id in str(raised.value)
    assert raised.value.__notes__ == ["2 more of the 3 envelopes failed"]
    # Confirms arrive again: the next batch succeeds (a multiple ack may settle the old tags).
    await bus.publish(_commands(2))


async def test_a_body_larger_than_a_frame_is_split_and_arrives_whole(bus: RabbitBus) -> None:
    received = await _collect(bus, "inventory")
    underlay = await _underlay(bus)
    size = 2 * underlay.max_content_size + 1000
    big = envelope(
        RouteKind.COMMAND,
        "inventory",
        body=json.dumps({"blob": "x" * size}).encode(),
    )
    exact = envelope(
        RouteKind.COMMAND,
        "inventory",
        body=json.dumps({"b": "y" * (underlay.max_content_size - 9)}).encode(),
    )
    assert len(exact.body) == underlay.max_content_size
    batch = [_commands(1)[0], big, exact, _commands(1)[0]]

    await bus.publish(batch)

    await eventually(lambda: len(received) == 4)
    assert [m.message_id for m in received] == [m.message_id for m in batch]
    assert [m.body for m in received] == [m.body for m in batch]


async def test_concurrent_publishers_share_writes_and_each_hears_of_its_own_failures(
    bus: RabbitBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = await _collect(bus, "inventory")
    await bus.publish(_commands(1))  # declares the queue, so the publishers below start together
    await eventually(lambda: len(received) == 1)
    writes: list[int] = []
    original = _aiormq._write_batch

    async def counting(
        channel: aiormq.Channel, messages: Sequence[Any]
    ) -> list[asyncio.Future[Any]]:
        writes.append(len(messages))
        return await original(channel, messages)

    monkeypatch.setattr(_aiormq, "_write_batch", counting)
    good = _commands(20)
    lost = envelope(RouteKind.REPLY, "nobody-listens-here")

    results = await asyncio.gather(
        *(bus.publish([message]) for message in [*good[:10], lost, *good[10:]]),
        return_exceptions=True,
    )

    failures = [result for result in results if result is not None]
    assert len(failures) == 1
    assert isinstance(failures[0], PublishError)
    assert lost.message_id in str(failures[0])
    assert results[10] is failures[0]
    assert sum(writes) == 21
    assert len(writes) < 21
    await eventually(lambda: len(received) == 21)
    assert {m.message_id for m in received[1:]} == {m.message_id for m in good}


async def test_a_publisher_cancelled_while_writing_for_others_fails_their_batches_at_once(
    bus: RabbitBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bus.publish(_commands(1))  # declares the queue
    original = _aiormq._write_batch
    first_entered, release_first, second_entered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held_then_stuck(
        channel: aiormq.Channel, messages: Sequence[Any]
    ) -> list[asyncio.Future[Any]]:
        if not first_entered.is_set():
            first_entered.set()
            await release_first.wait()
            return await original(channel, messages)
        second_entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")

    monkeypatch.setattr(_aiormq, "_write_batch", held_then_stuck)
    first = asyncio.create_task(bus.publish(_commands(1)))
    await first_entered.wait()
    writer = asyncio.create_task(bus.publish(_commands(1)))
    others = [asyncio.create_task(bus.publish(_commands(1))) for _ in range(3)]
    await asyncio.sleep(0.05)  # all queued behind the first write
    release_first.set()
    await first
    await second_entered.wait()  # the next publisher writes every queued batch

    writer.cancel()

    with pytest.raises(asyncio.CancelledError):
        await writer
    results = await asyncio.gather(*others, return_exceptions=True)
    # Told of the interruption, not left to time out.
    assert all(isinstance(r, PublishError) and "interrupted" in str(r) for r in results)
