"""Fixtures of the RabbitMQ integration suite: a unique prefix per test, buses, clean-up."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import (
    delete_topology,
    rabbitmqctl_available,
    sweep,
    unique_prefix,
)
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.hardening import store_of_this_test

DELIVERY_LIMIT = 2
"""Redeliveries before dead-lettering in these tests: three deliveries in all."""

BusFactory = Callable[..., Awaitable[RabbitBus]]

_prefixes: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers(amqp_url: str) -> Iterator[None]:
    """Safety net: at the end, delete anything a test of this session left behind."""
    yield
    if not _prefixes or not rabbitmqctl_available():
        return
    import asyncio  # noqa: PLC0415 - only needed here

    with contextlib.suppress(subprocess.SubprocessError, OSError):
        asyncio.run(sweep(amqp_url, *(f"{prefix}." for prefix in _prefixes)))


@pytest.fixture
def prefix() -> str:
    """A prefix of this test only."""
    name = unique_prefix()
    _prefixes.append(name)
    return name


@pytest.fixture
async def connect(amqp_url: str, prefix: str) -> AsyncIterator[BusFactory]:
    """Connect buses under the test's prefix; all are closed and their topology deleted."""
    buses: list[RabbitBus] = []

    async def factory(**overrides: Any) -> RabbitBus:
        options: dict[str, Any] = {
            "prefix": prefix,
            "delivery_limit": DELIVERY_LIMIT,
            "publish_timeout": 3.0,
            "close_timeout": 3.0,
            "reconnect_interval": 0.3,
        }
        options.update(overrides)
        bus = await RabbitBus.connect(options.pop("url", amqp_url), **options)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close()
    queues: set[str] = set()
    for bus in buses:
        queues |= bus.declared_queues
    await delete_topology(amqp_url, prefix=prefix, queues=queues)


@pytest.fixture
async def bus(connect: BusFactory) -> RabbitBus:
    """A bus with quorum queues under the test's prefix."""
    return await connect()


@pytest.fixture
def needs_rabbitmqctl() -> None:
    """Skip when rabbitmqctl is not on PATH (a remote broker, say)."""
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on PATH")


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    """A PostgreSQL saga store on tables of this test's own, dropped after it."""
    async with store_of_this_test(postgres_url) as store:
        yield store
