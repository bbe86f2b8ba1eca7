"""The bus contract, run against the shipped in-memory bus, plus its test hooks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sagas_abstractions import Envelope, MessageBus, PublishError, RouteKind
from sagas_core.testing import InMemoryBus, topic_matches
from tests.contracts.bus_contract import MessageBusContract, Recorder, make_message
from tests.waiting import eventually

MAX_DELIVERIES = 3


class TestInMemoryBus(MessageBusContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MessageBus]:
        bus = InMemoryBus(max_deliveries=MAX_DELIVERIES)
        yield bus
        await bus.close()


@pytest.fixture
async def memory_bus() -> AsyncIterator[InMemoryBus]:
    bus = InMemoryBus(max_deliveries=MAX_DELIVERIES)
    yield bus
    await bus.close()


async def test_a_failing_message_is_delivered_exactly_max_deliveries_times_then_dead_lettered(
    memory_bus: InMemoryBus,
) -> None:
    attempts = 0

    async def broken(envelope: Envelope) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("disk full")

    await memory_bus.subscribe(RouteKind.COMMAND, "inventory", broken)
    message = make_message("inventory")

    await memory_bus.publish([message])

    await eventually(lambda: bool(memory_bus.dead_letters()))
    assert attempts == MAX_DELIVERIES
    [dead] = memory_bus.dead_letters()
    assert dead.message_id == message.message_id
    reason = dead.headers["x-death-reason"]
    assert f"delivery limit {MAX_DELIVERIES}" in reason
    assert "disk full" in reason


async def test_fail_next_publishes_raises_publish_error_and_delivers_nothing(
    memory_bus: InMemoryBus,
) -> None:
    recorder = Recorder()
    await memory_bus.subscribe(RouteKind.COMMAND, "inventory", recorder)
    memory_bus.fail_next_publishes(2)
    message = make_message("inventory")

    for _ in range(2):
        with pytest.raises(PublishError):
            await memory_bus.publish([message])
    await memory_bus.wait_idle(timeout=1)
    assert recorder.received == []
    assert memory_bus.published == []

    await memory_bus.publish([message])
    await recorder.wait_for(1)
    assert memory_bus.published == [message]


async def test_duplicate_deliveries_hands_every_message_over_twice() -> None:
    bus = InMemoryBus(duplicate_deliveries=True)
    recorder = Recorder()
    await bus.subscribe(RouteKind.COMMAND, "inventory", recorder)
    message = make_message("inventory")

    await bus.publish([message])

    await bus.wait_idle(timeout=1)
    assert recorder.ids == [message.message_id, message.message_id]
    assert bus.published == [message]
    await bus.close()


async def test_wait_idle_returns_once_consumed_queues_are_empty_and_handlers_done(
    memory_bus: InMemoryBus,
) -> None:
    finished: list[str] = []

    async def slow(envelope: Envelope) -> None:
        await asyncio.sleep(0.02)
        finished.append(envelope.message_id)

    await memory_bus.subscribe(RouteKind.COMMAND, "inventory", slow)
    await memory_bus.publish([make_message("inventory") for _ in range(3)])

    await memory_bus.wait_idle(timeout=2)

    assert len(finished) == 3


async def test_wait_idle_times_out_while_a_handler_hangs(memory_bus: InMemoryBus) -> None:
    release = asyncio.Event()

    async def hanging(envelope: Envelope) -> None:
        await release.wait()

    await memory_bus.subscribe(RouteKind.COMMAND, "inventory", hanging)
    await memory_bus.publish([make_message("inventory")])

    with pytest.raises(TimeoutError):
        await memory_bus.wait_idle(timeout=0.05)
    release.set()
    await memory_bus.wait_idle(timeout=1)


async def test_queued_counts_messages_waiting_for_a_consumer(memory_bus: InMemoryBus) -> None:
    await memory_bus.publish([make_message("inventory"), make_message("inventory")])

    assert memory_bus.queued(RouteKind.COMMAND, "inventory") == 2
    assert memory_bus.queued(RouteKind.COMMAND, "payments") == 0


async def test_dead_letters_lists_messages_published_to_the_dead_letter_route(
    memory_bus: InMemoryBus,
) -> None:
    parked = make_message("compensation-failed", route=RouteKind.DEAD_LETTER)

    await memory_bus.publish([parked])

    assert memory_bus.dead_letters() == [parked]


async def test_subscribe_refuses_a_concurrency_below_one(memory_bus: InMemoryBus) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await memory_bus.subscribe(RouteKind.COMMAND, "inventory", Recorder(), concurrency=0)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("order.*", "order.started", True),
        ("order.*", "order.step.completed", False),
        ("order.*", "order", False),
        ("order.#", "order", True),
        ("order.#", "order.step.completed", True),
        ("#", "anything.at.all", True),
        ("*.completed", "order.completed", True),
        ("*.completed", "order.started", False),
        ("order.started", "order.started", True),
        ("#.completed", "a.b.completed", True),
    ],
)
def test_topic_matches_follows_amqp_topic_rules(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_closing_cancels_a_handler_that_outlasts_close_timeout_and_requeues_its_message() -> (
    None
):
    bus = InMemoryBus(close_timeout=0.05)
    never = asyncio.Event()
    started = asyncio.Event()

    async def hanging(envelope: Envelope) -> None:
        started.set()
        await never.wait()

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", hanging)
    await bus.publish([make_message("inventory")])
    async with asyncio.timeout(1):
        await started.wait()
        await subscription.close()

    assert bus.queued(RouteKind.COMMAND, "inventory") == 1
    await bus.close()
