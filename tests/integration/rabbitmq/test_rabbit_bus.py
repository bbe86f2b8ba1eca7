"""RabbitBus on the real broker: what the generic bus contract cannot say."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aio_pika
import pytest

from sagas_abstractions import Envelope, PublishError, RouteKind, TransportError
from sagas_rabbitmq import DEAD_LETTER_REASON_HEADER, RabbitBus
from sagas_rabbitmq.testing import list_consumers, list_queues
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]
DELIVERY_LIMIT = 2
WAIT = 5.0


def envelope(route: RouteKind, key: str, **changes: object) -> Envelope:
    message = Envelope(
        route=route,
        key=key,
        message_id=f"msg-{uuid.uuid4().hex[:10]}",
        message_type="ReserveInventory",
        correlation_id="saga-1",
        reply_to="sagas.replies.default",
        headers={
            "x-saga-type": "order",
            "x-saga-step": "reserve",
            "x-saga-attempt": "1",
            "x-saga-kind": "execute",
            "x-idempotency-key": "saga-1:reserve:execute",
        },
        body=b'{"sku": "A-1", "quantity": 2}',
        timestamp=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
    )
    return message.model_copy(update=changes)


# ---------------------------------------------------------------------- publishing


async def test_replies_carry_the_connections_user_and_nothing_else_carries_another(
    bus: RabbitBus, amqp_url: str
) -> None:
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    await bus.subscribe(RouteKind.REPLY, "probe-replies", record)
    await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", record)
    reply = envelope(RouteKind.REPLY, "probe-replies")
    # What arrived from another publisher and is passed on (a dead letter, say) keeps no user
    # id: the broker would close the channel over one that is not this connection's.
    passed_on = envelope(RouteKind.DEAD_LETTER, "parked", user_id="another-service")

    await bus.publish([reply, passed_on])

    await eventually(lambda: len(received) == 2)
    users = {message.message_id: message.user_id for message in received}
    user = urlsplit(amqp_url).username
    assert user
    assert bus.user == user
    assert users == {reply.message_id: user, passed_on.message_id: None}


async def test_a_reply_to_an_address_without_a_queue_raises_publish_error(
    bus: RabbitBus,
) -> None:
    reply = envelope(RouteKind.REPLY, "nobody-listens-here")

    with pytest.raises(PublishError, match="unroutable") as raised:
        await bus.publish([reply])

    assert raised.value.saga_id == "saga-1"
    assert raised.value.__cause__ is not None


async def test_a_batch_with_one_unroutable_message_fails_and_the_routable_ones_arrive(
    bus: RabbitBus,
) -> None:
    received: list[str] = []

    async def record(message: Envelope) -> None:
        received.append(message.message_id)

    await bus.subscribe(RouteKind.COMMAND, "inventory", record)
    good = [envelope(RouteKind.COMMAND, "inventory") for _ in range(3)]
    lost = envelope(RouteKind.REPLY, "nobody-listens-here")

    with pytest.raises(PublishError):
        await bus.publish([good[0], lost, *good[1:]])

    await eventually(lambda: len(received) == 3)
    assert received == [message.message_id for message in good]


async def test_an_event_nobody_subscribed_to_is_accepted(bus: RabbitBus) -> None:
    await bus.publish([envelope(RouteKind.EVENT, "order.completed")])


async def test_a_command_published_before_its_participant_exists_is_kept(
    bus: RabbitBus, connect: BusFactory
) -> None:
    command = envelope(RouteKind.COMMAND, "late-participant")
    await bus.publish([command])
    participant_bus = await connect()
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    await participant_bus.subscribe(RouteKind.COMMAND, "late-participant", record)

    await eventually(lambda: len(received) == 1)
    assert received[0].message_id == command.message_id


async def test_publishing_on_a_closed_bus_raises_publish_error(bus: RabbitBus) -> None:
    await bus.close()

    with pytest.raises(PublishError, match="closed"):
        await bus.publish([envelope(RouteKind.COMMAND, "inventory")])
    with pytest.raises(TransportError, match="closed"):
        await bus.subscribe(RouteKind.COMMAND, "inventory", _ignore)


async def _ignore(message: Envelope) -> None:
    return None


async def test_amqp_properties_follow_the_protocol(bus: RabbitBus, amqp_url: str) -> None:
    command = envelope(RouteKind.COMMAND, "inventory")
    await bus.publish([command])

    connection = await aio_pika.connect(amqp_url, timeout=WAIT)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(bus.topology.command_queue("inventory"), passive=True)
        raw = await queue.get(timeout=WAIT, fail=True)
        assert raw is not None
        await raw.ack()

    assert raw.exchange == f"{bus.topology.prefix}.commands"
    assert raw.routing_key == "inventory"
    assert raw.message_id == command.message_id
    assert raw.correlation_id == "saga-1"
    assert raw.type == "ReserveInventory"
    assert raw.reply_to == "sagas.replies.default"
    assert raw.content_type == "application/json"
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert raw.timestamp is not None
    assert raw.timestamp.replace(tzinfo=UTC) == command.timestamp
    assert raw.headers.items() >= command.headers.items()
    assert raw.body == command.body


# ---------------------------------------------------------------------- topology


async def test_queues_are_quorum_queues_with_a_delivery_limit_and_a_dead_letter_exchange(
    bus: RabbitBus,
) -> None:
    arguments = bus.topology.queue_arguments()

    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == DELIVERY_LIMIT
    assert arguments["x-dead-letter-exchange"] == f"{bus.topology.prefix}.dead-letter"


@pytest.mark.usefixtures("needs_rabbitmqctl")
async def test_connect_declares_the_dead_letter_queue_and_names_carry_the_prefix(
    bus: RabbitBus, prefix: str
) -> None:
    await bus.subscribe(RouteKind.COMMAND, "inventory", _ignore)
    await bus.subscribe(RouteKind.REPLY, "sagas.replies.default", _ignore)
    await bus.subscribe(RouteKind.EVENT, "order.*", _ignore)

    queues = await asyncio.to_thread(list_queues, f"{prefix}.")

    digest = bus.topology.event_queue("order.*").rsplit(".", 1)[1]  # "*" is no queue name
    assert set(queues) == {
        f"{prefix}.dead-letter",
        f"{prefix}.commands.inventory",
        f"{prefix}.replies.sagas.replies.default",
        # this process's own replies (RabbitSettings.reply_affinity)
        f"{prefix}.replies.sagas.replies.default.own.{bus.instance}",
        f"{prefix}.events.default.order.any.{digest}",
    }
    consumers = await asyncio.to_thread(list_consumers, f"{prefix}.")
    assert consumers == dict.fromkeys(set(queues) - {f"{prefix}.dead-letter"}, 1)


async def test_connecting_with_queue_arguments_that_differ_from_the_broker_raises(
    bus: RabbitBus, connect: BusFactory
) -> None:
    with pytest.raises(TransportError, match="declaring the topology"):
        await connect(quorum=False)


async def test_connecting_to_a_broker_that_does_not_answer_raises_transport_error() -> None:
    with pytest.raises(TransportError, match="connecting"):
        await RabbitBus.connect("amqp://guest:guest@127.0.0.1:1/", connect_timeout=2.0)


# ---------------------------------------------------------------------- consuming


@pytest.mark.parametrize("quorum", [True, False], ids=["quorum", "classic"])
async def test_a_message_whose_handler_keeps_failing_is_dead_lettered_after_the_limit(
    connect: BusFactory, quorum: bool
) -> None:
    bus = await connect(quorum=quorum)
    deliveries: list[str] = []
    dead: list[Envelope] = []

    async def broken(message: Envelope) -> None:
        deliveries.append(message.message_id)
        raise RuntimeError("disk full")

    async def park(message: Envelope) -> None:
        dead.append(message)

    await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", park)
    await bus.subscribe(RouteKind.COMMAND, "inventory", broken)
    command = envelope(RouteKind.COMMAND, "inventory")

    await bus.publish([command])

    await eventually(lambda: len(dead) == 1)
    await asyncio.sleep(0.2)
    assert deliveries == [command.message_id] * (DELIVERY_LIMIT + 1)
    [parked] = dead
    assert parked.route is RouteKind.DEAD_LETTER
    assert parked.key == "inventory"
    assert parked.message_id == command.message_id
    assert parked.body == command.body
    assert parked.headers.items() >= command.headers.items()
    reason = parked.headers[DEAD_LETTER_REASON_HEADER]
    assert "delivery limit" in reason
    assert bus.topology.command_queue("inventory") in reason
    if not quorum:
        assert "disk full" in reason  # the classic fallback knows the handler's error


async def test_prefetch_and_concurrency_bound_the_messages_a_subscription_holds(
    bus: RabbitBus, amqp_url: str
) -> None:
    release = asyncio.Event()
    active, peak, done = 0, 0, 0

    async def slow(message: Envelope) -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        async with asyncio.timeout(WAIT):
            await release.wait()
        active -= 1
        done += 1

    subscription = await bus.subscribe(RouteKind.COMMAND, "inventory", slow, concurrency=2)
    await bus.publish([envelope(RouteKind.COMMAND, "inventory") for _ in range(6)])
    await eventually(lambda: active == 2)
    await asyncio.sleep(0.3)

    ready = await _ready_messages(amqp_url, bus.topology.command_queue("inventory"))
    assert (peak, subscription.in_flight) == (2, 2)
    assert ready == 4  # the broker holds back what the prefetch does not allow

    release.set()
    await eventually(lambda: done == 6)
    assert peak == 2


async def _ready_messages(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=WAIT)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def test_close_lets_handlers_in_flight_finish_and_acks_them(
    bus: RabbitBus, connect: BusFactory
) -> None:
    started, finished = asyncio.Event(), []

    async def slow(message: Envelope) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(message.message_id)

    await bus.subscribe(RouteKind.COMMAND, "inventory", slow)
    command = envelope(RouteKind.COMMAND, "inventory")
    await bus.publish([command])
    async with asyncio.timeout(WAIT):
        await started.wait()

    await bus.close()

    assert finished == [command.message_id]
    again: list[str] = []

    async def record(message: Envelope) -> None:
        again.append(message.message_id)

    other = await connect()
    await other.subscribe(RouteKind.COMMAND, "inventory", record)
    await asyncio.sleep(0.3)
    assert again == []  # acked before the channel closed: not redelivered


async def test_is_ready_is_true_while_every_consumer_is_registered(bus: RabbitBus) -> None:
    await bus.subscribe(RouteKind.COMMAND, "inventory", _ignore, concurrency=4)

    assert await bus.is_ready()

    await bus.close()
    assert not await bus.is_ready()


async def test_an_event_subscription_opened_again_consumes_the_queue_it_had(bus: RabbitBus) -> None:
    # The n-th open subscription to a pattern consumes queue n; one that closes frees n, so the
    # next subscription takes that queue again (with what arrived meanwhile) instead of leaving
    # it bound, filling up with events nobody reads, next to a new queue n + 1.
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    first = await bus.subscribe(RouteKind.EVENT, "order.completed", _ignore)
    second = await bus.subscribe(RouteKind.EVENT, "order.completed", _ignore)
    assert (first.queue_name, second.queue_name) == (
        bus.topology.event_queue("order.completed", 1),
        bus.topology.event_queue("order.completed", 2),
    )
    await first.close()
    meanwhile = envelope(RouteKind.EVENT, "order.completed")
    await bus.publish([meanwhile])

    again = await bus.subscribe(RouteKind.EVENT, "order.completed", record)

    assert again.queue_name == first.queue_name
    await eventually(lambda: len(received) == 1)
    assert received[0].message_id == meanwhile.message_id


async def test_an_event_subscription_the_broker_refuses_frees_its_ordinal(
    bus: RabbitBus, amqp_url: str
) -> None:
    # Queue 1 of the pattern exists with other arguments (a classic queue), so the broker
    # refuses the subscription; once it is gone, the next subscription takes queue 1, not 2.
    name = bus.topology.event_queue("order.completed", 1)
    connection = await aio_pika.connect(amqp_url, timeout=WAIT)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
        with pytest.raises(TransportError, match="subscribing"):
            await bus.subscribe(RouteKind.EVENT, "order.completed", _ignore)
        channel = await connection.channel()
        await channel.queue_delete(name)
    finally:
        await connection.close()

    again = await bus.subscribe(RouteKind.EVENT, "order.completed", _ignore)

    assert again.queue_name == name
