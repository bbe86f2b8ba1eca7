"""The contract every :class:`~sagas_abstractions.MessageBus` backend passes.

A backend's test module subclasses :class:`MessageBusContract` and overrides one fixture::

    class TestRabbitBus(MessageBusContract):
        settle_seconds = 0.3

        @pytest.fixture
        async def bus(self) -> AsyncIterator[MessageBus]:
            bus = await make_rabbit_bus(max_deliveries=3)
            yield bus
            await bus.close()

Everything goes through the port. Keys are unique per test, so a broker shared by several
tests never mixes their messages; dead letters are matched by message id for the same reason.
The bus should redeliver a failing message a small number of times (3 is a good limit) so the
dead-letter test stays fast. ``bus.close()`` must be safe to call twice: some tests close the
bus before the fixture's teardown does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from sagas_abstractions import (
    BusUnavailable,
    Envelope,
    MessageBus,
    MessageDecodeError,
    RouteKind,
    StoreUnavailable,
    TransportError,
    Unavailable,
)
from tests.waiting import eventually

__all__ = ["MessageBusContract", "Recorder", "make_message", "unique"]

WAIT_SECONDS = 5.0
"""Upper bound of every wait for a delivery."""

REASON_HEADER = "x-dead-letter-reason"
"""Why a message that cannot get better was dead-lettered (docs/protocol.md, section 3)."""


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_message(
    key: str,
    message_id: str | None = None,
    *,
    route: RouteKind = RouteKind.COMMAND,
    body: bytes = b'{"sku": "A-1"}',
) -> Envelope:
    """An envelope to ``route``/``key`` with a unique id unless one is given."""
    return Envelope(
        route=route,
        key=key,
        message_id=message_id or unique("msg"),
        message_type="ReserveInventory",
        correlation_id="saga-1",
        reply_to="replies.default",
        headers={"x-saga-type": "order", "x-saga-step": "reserve", "x-saga-attempt": "1"},
        body=body,
        # Whole seconds: AMQP timestamps carry no fraction.
        timestamp=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
    )


class Recorder:
    """A handler that records what it receives; waits on it are bounded."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def __call__(self, envelope: Envelope) -> None:
        self.received.append(envelope)

    @property
    def ids(self) -> list[str]:
        """Message ids received, in order."""
        return [envelope.message_id for envelope in self.received]

    async def wait_for(self, count: int, timeout: float = WAIT_SECONDS) -> list[Envelope]:
        """Wait until at least ``count`` messages arrived."""
        await eventually(lambda: len(self.received) >= count, timeout=timeout)
        return self.received


class MessageBusContract:
    """Tests of the delivery semantics documented on :class:`~sagas_abstractions.MessageBus`.

    Subclasses override the ``bus`` fixture and may raise ``settle_seconds``: how long a test
    waits to be sure that nothing more arrives.
    """

    settle_seconds = 0.05

    @pytest.fixture
    async def bus(self) -> AsyncIterator[MessageBus]:
        """Yield a connected bus of the backend under test (subclasses override this)."""
        pytest.skip("the bus fixture is provided by a backend subclass")
        yield  # type: ignore[unreachable]  # noqa: PT022 - an async generator, like overrides

    async def settle(self) -> None:
        """Give a backend time to deliver anything it should not."""
        await asyncio.sleep(self.settle_seconds)

    # ------------------------------------------------------------------ queues

    async def test_a_message_published_before_anyone_subscribes_waits_for_a_consumer(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        message = make_message(key)
        await bus.publish([message])
        recorder = Recorder()

        await bus.subscribe(RouteKind.COMMAND, key, recorder)

        [received] = await recorder.wait_for(1)
        assert received.message_id == message.message_id

    async def test_delivers_the_envelope_with_its_properties_headers_and_body(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        recorder = Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, recorder)
        message = make_message(key, body='{"note": "größe ✓"}'.encode())

        await bus.publish([message])

        [received] = await recorder.wait_for(1)
        assert (received.route, received.key) == (RouteKind.COMMAND, key)
        assert received.message_id == message.message_id
        assert received.message_type == message.message_type
        assert received.correlation_id == message.correlation_id
        assert received.reply_to == message.reply_to
        assert received.body == message.body
        assert received.headers.items() >= message.headers.items()
        assert received.timestamp == message.timestamp

    async def test_a_single_consumer_receives_a_queue_in_publish_order(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        recorder = Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, recorder)
        messages = [make_message(key, f"{key}-{n}") for n in range(10)]

        await bus.publish(messages[:5])
        await bus.publish(messages[5:])

        await recorder.wait_for(10)
        assert recorder.ids == [message.message_id for message in messages]

    async def test_commands_and_replies_with_the_same_key_go_to_separate_queues(
        self, bus: MessageBus
    ) -> None:
        key = unique("shared")
        commands, replies = Recorder(), Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, commands)
        await bus.subscribe(RouteKind.REPLY, key, replies)
        command = make_message(key)
        reply = make_message(key, route=RouteKind.REPLY)

        await bus.publish([command, reply])

        await commands.wait_for(1)
        await replies.wait_for(1)
        await self.settle()
        assert commands.ids == [command.message_id]
        assert replies.ids == [reply.message_id]

    async def test_competing_consumers_on_one_key_handle_each_message_once(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        first, second = Recorder(), Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, first)
        await bus.subscribe(RouteKind.COMMAND, key, second)
        messages = [make_message(key) for _ in range(20)]

        await bus.publish(messages)

        await eventually(lambda: len(first.received) + len(second.received) >= len(messages))
        await self.settle()
        handled = first.ids + second.ids
        assert sorted(handled) == sorted(message.message_id for message in messages)

    # ------------------------------------------------------------------ events

    async def test_events_reach_every_subscription_whose_topic_pattern_matches(
        self, bus: MessageBus
    ) -> None:
        saga_type = unique("order")
        orders, started, everything, refunds = Recorder(), Recorder(), Recorder(), Recorder()
        await bus.subscribe(RouteKind.EVENT, f"{saga_type}.*", orders)
        await bus.subscribe(RouteKind.EVENT, f"{saga_type}.started", started)
        await bus.subscribe(RouteKind.EVENT, "#", everything)
        await bus.subscribe(RouteKind.EVENT, f"refund-{saga_type}.*", refunds)
        events = {
            key: make_message(key, route=RouteKind.EVENT)
            for key in (
                f"{saga_type}.started",
                f"{saga_type}.completed",
                f"{saga_type}.step.completed",
            )
        }

        await bus.publish(list(events.values()))

        ours = {event.message_id for event in events.values()}
        await eventually(lambda: ours <= set(everything.ids))
        await orders.wait_for(2)
        await started.wait_for(1)
        await self.settle()
        assert sorted(orders.ids) == sorted(
            events[key].message_id for key in (f"{saga_type}.started", f"{saga_type}.completed")
        )
        assert started.ids == [events[f"{saga_type}.started"].message_id]
        assert [message_id for message_id in everything.ids if message_id in ours] == [
            event.message_id for event in events.values()
        ]
        assert refunds.received == []

    async def test_each_event_subscription_receives_its_own_copy(self, bus: MessageBus) -> None:
        saga_type = unique("order")
        dashboard, audit = Recorder(), Recorder()
        await bus.subscribe(RouteKind.EVENT, f"{saga_type}.*", dashboard)
        await bus.subscribe(RouteKind.EVENT, f"{saga_type}.*", audit)
        event = make_message(f"{saga_type}.completed", route=RouteKind.EVENT)

        await bus.publish([event])

        await dashboard.wait_for(1)
        await audit.wait_for(1)
        await self.settle()
        assert dashboard.ids == audit.ids == [event.message_id]

    # ------------------------------------------------------------------ failures

    async def test_a_message_whose_handler_raises_is_redelivered(self, bus: MessageBus) -> None:
        key = unique("inventory")
        attempts: list[str] = []
        done = Recorder()

        async def flaky(envelope: Envelope) -> None:
            attempts.append(envelope.message_id)
            if len(attempts) < 2:
                raise RuntimeError("transient handler failure")
            await done(envelope)

        await bus.subscribe(RouteKind.COMMAND, key, flaky)
        message = make_message(key)

        await bus.publish([message])

        await done.wait_for(1)
        await self.settle()
        assert attempts == [message.message_id, message.message_id]
        assert done.ids == [message.message_id]

    async def test_a_message_that_keeps_failing_goes_to_the_dead_letter_queue(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        attempts: list[str] = []
        dead = Recorder()
        await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", dead)

        async def broken(envelope: Envelope) -> None:
            attempts.append(envelope.message_id)
            raise RuntimeError("permanent handler failure")

        await bus.subscribe(RouteKind.COMMAND, key, broken)
        message = make_message(key)

        await bus.publish([message])

        await eventually(lambda: message.message_id in dead.ids)
        await self.settle()
        assert len(attempts) >= 2
        [dead_letter] = [d for d in dead.received if d.message_id == message.message_id]
        assert dead_letter.body == message.body
        assert dead_letter.headers.items() >= message.headers.items()

    async def test_a_message_whose_handler_cannot_decode_it_is_dead_lettered_at_once_with_why(
        self, bus: MessageBus
    ) -> None:
        key = unique("replies")
        attempts: list[str] = []
        dead = Recorder()
        await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", dead)

        async def strict(envelope: Envelope) -> None:
            attempts.append(envelope.message_id)
            raise MessageDecodeError(f"reply {envelope.message_id!r} body is not valid JSON")

        await bus.subscribe(RouteKind.REPLY, key, strict)
        message = make_message(key, route=RouteKind.REPLY, body=b"not json")

        await bus.publish([message])

        await eventually(lambda: message.message_id in dead.ids)
        await self.settle()
        assert attempts == [message.message_id]
        [dead_letter] = [d for d in dead.received if d.message_id == message.message_id]
        assert "body is not valid JSON" in dead_letter.headers[REASON_HEADER]
        assert dead_letter.body == message.body
        assert dead_letter.headers.items() >= message.headers.items()

    @pytest.mark.parametrize(
        "outage",
        [
            StoreUnavailable("the database refuses connections"),
            # A participant whose reply could not go out: the channel it publishes on is
            # recovering while the one it consumes on is back already.
            BusUnavailable("message 'm-1:reply' was not accepted: ChannelInvalidStateError"),
        ],
        ids=["store", "broker"],
    )
    async def test_messages_whose_handler_finds_the_store_or_broker_unavailable_wait_uncounted(
        self, bus: MessageBus, outage: Unavailable
    ) -> None:
        key = unique("replies")
        store_down = True
        refused: list[str] = []
        handled = Recorder()
        dead = Recorder()
        await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", dead)

        async def needs_the_store(envelope: Envelope) -> None:
            if store_down:
                refused.append(envelope.message_id)
                raise outage
            await handled(envelope)

        await bus.subscribe(RouteKind.REPLY, key, needs_the_store, concurrency=3)
        messages = [make_message(key, route=RouteKind.REPLY) for _ in range(5)]

        await bus.publish(messages)
        # One message refused more often than a delivery limit of 3 allows, then the store is back.
        await eventually(lambda: max(Counter(refused).values(), default=0) > 3)
        store_down = False

        await handled.wait_for(len(messages))
        await self.settle()
        assert sorted(handled.ids) == sorted(m.message_id for m in messages)
        assert not {m.message_id for m in messages} & set(dead.ids)

    async def test_a_message_published_to_the_dead_letter_route_reaches_its_consumer(
        self, bus: MessageBus
    ) -> None:
        dead = Recorder()
        await bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", dead)
        parked = make_message("compensation-failed", route=RouteKind.DEAD_LETTER)

        await bus.publish([parked])

        await eventually(lambda: parked.message_id in dead.ids)

    # ------------------------------------------------------------------ concurrency

    async def test_concurrency_above_one_handles_messages_in_parallel(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        active, peak, done = 0, 0, Recorder()
        all_in = asyncio.Event()

        async def slow(envelope: Envelope) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active == 3:
                all_in.set()
            async with asyncio.timeout(WAIT_SECONDS):
                await all_in.wait()
            active -= 1
            await done(envelope)

        await bus.subscribe(RouteKind.COMMAND, key, slow, concurrency=3)

        await bus.publish([make_message(key) for _ in range(3)])

        await done.wait_for(3)
        assert peak == 3

    async def test_concurrency_one_handles_messages_one_at_a_time(self, bus: MessageBus) -> None:
        key = unique("inventory")
        active, peak, done = 0, 0, Recorder()

        async def slow(envelope: Envelope) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            await done(envelope)

        await bus.subscribe(RouteKind.COMMAND, key, slow)

        await bus.publish([make_message(key) for _ in range(3)])

        await done.wait_for(3)
        assert peak == 1

    # ------------------------------------------------------------------ closing

    async def test_a_closed_subscription_stops_receiving_and_leaves_messages_queued(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        first = Recorder()
        subscription = await bus.subscribe(RouteKind.COMMAND, key, first)
        await bus.publish([make_message(key)])
        await first.wait_for(1)

        await subscription.close()
        later = make_message(key)
        await bus.publish([later])
        await self.settle()

        assert len(first.received) == 1
        second = Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, second)
        await second.wait_for(1)
        assert second.ids == [later.message_id]

    async def test_closing_a_subscription_lets_the_message_being_handled_finish(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        started, release = asyncio.Event(), asyncio.Event()
        finished: list[str] = []

        async def slow(envelope: Envelope) -> None:
            started.set()
            async with asyncio.timeout(WAIT_SECONDS):
                await release.wait()
            finished.append(envelope.message_id)

        subscription = await bus.subscribe(RouteKind.COMMAND, key, slow)
        message = make_message(key)
        await bus.publish([message])
        async with asyncio.timeout(WAIT_SECONDS):
            await started.wait()

        closing = asyncio.create_task(subscription.close())
        await asyncio.sleep(self.settle_seconds)
        assert not closing.done()
        release.set()
        async with asyncio.timeout(WAIT_SECONDS):
            await closing

        assert finished == [message.message_id]
        # It was acked: a new consumer of the queue does not get it again.
        later = Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, later)
        await self.settle()
        assert later.received == []

    async def test_a_closed_bus_delivers_nothing_and_refuses_to_publish(
        self, bus: MessageBus
    ) -> None:
        key = unique("inventory")
        recorder = Recorder()
        await bus.subscribe(RouteKind.COMMAND, key, recorder)

        await bus.close()

        with pytest.raises(TransportError):
            await bus.publish([make_message(key)])
        await self.settle()
        assert recorder.received == []

    async def test_closing_twice_is_harmless(self, bus: MessageBus) -> None:
        await bus.close()
        await bus.close()
