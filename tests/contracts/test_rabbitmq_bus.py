"""The bus contract, run against RabbitMQ (quorum queues, and the classic-queue fallback)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sagas_abstractions import MessageBus
from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import delete_topology, unique_prefix
from tests.contracts.bus_contract import MessageBusContract

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

DELIVERY_LIMIT = 2
"""Redeliveries before dead-lettering: three deliveries in all keep the dead-letter test fast."""


async def _rabbit_bus(amqp_url: str, *, quorum: bool) -> AsyncIterator[MessageBus]:
    prefix = unique_prefix()
    bus = await RabbitBus.connect(
        amqp_url,
        prefix=prefix,
        quorum=quorum,
        delivery_limit=DELIVERY_LIMIT,
        publish_timeout=5.0,
        close_timeout=5.0,
    )
    try:
        yield bus
    finally:
        await bus.close()
        await delete_topology(amqp_url, prefix=prefix, queues=bus.declared_queues)


class TestRabbitBusQuorum(MessageBusContract):
    settle_seconds = 0.2

    @pytest.fixture
    async def bus(self, amqp_url: str) -> AsyncIterator[MessageBus]:
        async for bus in _rabbit_bus(amqp_url, quorum=True):
            yield bus


class TestRabbitBusClassic(MessageBusContract):
    settle_seconds = 0.2

    @pytest.fixture
    async def bus(self, amqp_url: str) -> AsyncIterator[MessageBus]:
        async for bus in _rabbit_bus(amqp_url, quorum=False):
            yield bus
