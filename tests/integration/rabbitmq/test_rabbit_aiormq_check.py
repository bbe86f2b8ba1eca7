"""RabbitBus runs the aiormq capability check on connect and acts on it, loudly.

``tests/unit/test_aiormq_internals.py`` checks the installed aiormq and the check itself; these
tests check the bus's side against the real broker, with the check made to report an internal
as missing: a refusal to connect, or a warning and the slower path that then works.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

import pytest

from sagas_abstractions import Envelope, RouteKind
from sagas_rabbitmq import RabbitBus, _aiormq
from sagas_rabbitmq._aiormq import AiormqUnsupportedError, Feature, Internals
from tests.integration.rabbitmq.test_rabbit_bus import envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]


def _lacking(monkeypatch: pytest.MonkeyPatch, feature: Feature, name: str) -> None:
    """Make the capability check find ``name`` (needed for ``feature``) missing."""
    real = _aiormq.inspect_channel

    def inspect_channel(channel: object) -> Internals:
        found = real(channel)
        return dataclasses.replace(found, missing={**found.missing, feature: (name,)})

    monkeypatch.setattr(_aiormq, "inspect_channel", inspect_channel)


async def test_without_what_consuming_needs_connect_fails_naming_it(
    connect: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lacking(monkeypatch, Feature.CONSUMING, "Channel.consumers: dict")

    with pytest.raises(AiormqUnsupportedError, match=r"Channel\.consumers: dict") as raised:
        await connect()

    assert f"aiormq{_aiormq.SUPPORTED_AIORMQ}" in str(raised.value)


async def test_without_the_batch_internals_connect_warns_and_publishing_one_by_one_works(
    connect: BusFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _lacking(monkeypatch, Feature.BATCH_PUBLISH, "Channel.delivery_tag: int")

    with caplog.at_level(logging.WARNING, logger="sagas.rabbitmq"):
        bus = await connect()

    assert not bus.batch_publishing
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Channel.delivery_tag: int" in w and "one message at a time" in w for w in warnings)
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", record, concurrency=4)
    assert subscription._acks is not None  # ack batching is still there
    batch = [envelope(RouteKind.COMMAND, "inventory") for _ in range(3)]
    await bus.publish(batch)
    await eventually(lambda: len(received) == 3)


async def test_without_the_ack_internals_connect_warns_and_subscriptions_ack_one_by_one(
    connect: BusFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _lacking(monkeypatch, Feature.ACK_BATCHING, "Channel.write_queue: asyncio.Queue")

    with caplog.at_level(logging.WARNING, logger="sagas.rabbitmq"):
        bus = await connect()

    assert bus.batch_publishing
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Channel.write_queue" in w and "acking one message at a time" in w for w in warnings)
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", record, concurrency=4)
    assert subscription._acks is None
    batch = [envelope(RouteKind.COMMAND, "inventory") for _ in range(5)]
    await bus.publish(batch)
    await eventually(lambda: subscription.handled == 5)
