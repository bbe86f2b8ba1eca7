"""Fixtures of the telemetry tests: in-memory providers, and RabbitMQ buses under a test prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import delete_topology, unique_prefix
from tests.integration.telemetry.otel_support import Otel, make_otel

BusFactory = Callable[..., Awaitable[RabbitBus]]


@pytest.fixture
def otel() -> Otel:
    """A :class:`~sagas_core.telemetry.Telemetry` with in-memory span and metric exporters."""
    return make_otel()


@pytest.fixture
async def connect(amqp_url: str) -> AsyncIterator[BusFactory]:
    """Connect RabbitMQ buses under a prefix of this test; closed and deleted afterwards."""
    prefix = unique_prefix("sagas-otel")
    buses: list[RabbitBus] = []

    async def factory(**overrides: Any) -> RabbitBus:
        options: dict[str, Any] = {
            "prefix": prefix,
            "delivery_limit": 2,
            "publish_timeout": 3.0,
            "close_timeout": 3.0,
        }
        options.update(overrides)
        bus = await RabbitBus.connect(amqp_url, **options)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close()
    queues: set[str] = set()
    for bus in buses:
        queues |= bus.declared_queues
    await delete_topology(amqp_url, prefix=prefix, queues=queues)
