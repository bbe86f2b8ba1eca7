"""A real in-memory message bus: queues per address, competing consumers, ack after handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sagas_abstractions import (
    Envelope,
    MessageDecodeError,
    MessageHandler,
    PublishError,
    RouteKind,
)
from sagas_core.codec import HEADER_REASON
from sagas_core.outage import Outage

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["InMemoryBus", "topic_matches"]

_log = logging.getLogger("sagas.bus.memory")

DEAD_LETTER_QUEUE = (RouteKind.DEAD_LETTER, "dead-letter")

# Members as module constants for the per-message routing: on Python 3.11 looking a member up
# on its class (``RouteKind.EVENT``) takes EnumType.__getattr__'s slow path, ~90 ns a time.
_EVENT_ROUTE = RouteKind.EVENT
_DEAD_LETTER_ROUTE = RouteKind.DEAD_LETTER


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


@dataclass(slots=True)
class _Delivery:
    envelope: Envelope
    count: int = 1


class _Queue:
    """An unbounded FIFO of deliveries that consumers wait on.

    ``asyncio.Queue`` minus what the bus never uses (bounds, ``join``): a put and a get are one
    call each instead of six. And it wakes one waiting consumer at a time instead of one per
    message: a batch of messages put at once is taken by the first consumer to run, one after
    another, without a task switch per message. No message waits on a consumer that is held
    up, though: whenever one takes a message and more are left, the next waiting consumer is
    woken (unless one is already), so a handler that suspends leaves the rest to the others,
    up to every consumer at once, as before.
    """

    __slots__ = ("_getters", "_woken", "consumers", "messages")

    def __init__(self) -> None:
        self.messages: deque[_Delivery] = deque()
        self.consumers = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        self._woken = 0  # consumers woken that have not run yet

    def put(self, delivery: _Delivery) -> None:
        self.messages.append(delivery)
        if not self._woken:
            self._wake_next()

    async def get(self) -> _Delivery:
        messages = self.messages
        while not messages:
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter.done() and not getter.cancelled():
                    # Woken, then cancelled before it ran: pass the wake-up on.
                    self._woken -= 1
                    if messages and not self._woken:
                        self._wake_next()
                else:
                    getter.cancel()
                    with contextlib.suppress(ValueError):
                        self._getters.remove(getter)
                raise
            self._woken -= 1
        delivery = messages.popleft()
        if messages and not self._woken:
            self._wake_next()  # should this consumer be held up, another takes the next one
        return delivery

    def _wake_next(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                self._woken += 1
                return


class _Consumer:
    """One consuming task; ``busy`` while it handles a message, ``stopping`` once closed."""

    __slots__ = ("busy", "stopping", "task")

    def __init__(self) -> None:
        self.busy = False
        self.stopping = False
        self.task: asyncio.Task[None] | None = None


class _MemorySubscription:
    def __init__(self, bus: InMemoryBus, consumers: list[_Consumer]) -> None:
        self._bus = bus
        self._consumers = consumers

    async def close(self) -> None:
        # Like a broker consumer: stop taking messages, let the ones being handled finish (up
        # to the bus's close timeout), then cancel what is left (its message goes back).
        tasks = [c.task for c in self._consumers if c.task is not None]
        for consumer in self._consumers:
            consumer.stopping = True
            if not consumer.busy and consumer.task is not None:
                consumer.task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._bus.close_timeout)
            for task in pending:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._consumers.clear()


class InMemoryBus:
    """Implements :class:`~sagas_abstractions.MessageBus` in one process.

    Commands, replies and dead letters go to a queue per ``(route, key)`` that holds messages
    until a consumer takes them (like a durable queue); several subscriptions on one queue
    compete. Each event subscription gets its own queue bound by topic pattern. A handler that
    raises gets its message redelivered, up to ``max_deliveries`` in all; then the message goes
    to the dead-letter queue with an ``x-death-reason`` header. One that raises
    ``MessageDecodeError`` has it dead-lettered at once, with the error in
    ``x-dead-letter-reason``; one that raises ``StoreUnavailable`` has it held, uncounted, and
    tried again once the store answers (see :class:`~sagas_core.outage.Outage`). Closing a
    subscription lets the messages being handled finish first, for up to ``close_timeout``
    seconds.

    Test hooks: :meth:`fail_next_publishes` makes publishes raise ``PublishError`` (nothing is
    delivered), ``duplicate_deliveries`` delivers every message twice, and :attr:`published`
    records everything accepted: all of it, or with ``keep_published`` the latest that many
    (up to twice as many between trims), so a long-running process does not keep every message
    it ever sent (``SagaRuntime`` and ``sagas worker`` without a broker keep 10,000).
    """

    messaging_system = "sagas.in_memory"
    """The OpenTelemetry ``messaging.system`` of this transport."""

    in_process = True
    """Messages never outlive the process, so in-memory outcome caches suffice."""

    def __init__(
        self,
        *,
        max_deliveries: int = 5,
        duplicate_deliveries: bool = False,
        close_timeout: float = 10.0,
        keep_published: int | None = None,
    ) -> None:
        if keep_published is not None and keep_published < 1:
            raise ValueError(
                f"InMemoryBus: keep_published must be at least 1, not {keep_published}"
            )
        self.max_deliveries = max_deliveries
        self.keep_published = keep_published
        self.duplicate_deliveries = duplicate_deliveries
        self.close_timeout = close_timeout
        self.published: list[Envelope] = []
        self._queues: dict[tuple[RouteKind, str], _Queue] = {}
        self._event_queues: list[tuple[str, _Queue]] = []
        self._subscriptions: list[_MemorySubscription] = []
        self._publish_failures = 0
        self._in_flight = 0
        self._closed = False

    # ------------------------------------------------------------------ test hooks

    def fail_next_publishes(self, count: int = 1) -> None:
        """Make the next ``count`` publish calls raise ``PublishError``."""
        self._publish_failures += count

    def queued(self, route: RouteKind, key: str) -> int:
        """How many messages wait in the queue for ``route``/``key``."""
        queue = self._queues.get((route, key))
        return 0 if queue is None else len(queue.messages)

    def dead_letters(self) -> list[Envelope]:
        """Messages waiting in the dead-letter queue (the bus's own and parked compensations)."""
        return [m for m in self.published if m.route is RouteKind.DEAD_LETTER] + [
            d.envelope
            for d in list(self._queue(DEAD_LETTER_QUEUE).messages)
            if d.envelope.route is not RouteKind.DEAD_LETTER
        ]

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no consumed queue holds a message and no handler runs (bounded)."""
        async with asyncio.timeout(timeout):
            while True:
                busy = self._in_flight or any(
                    q.consumers and q.messages
                    for q in [*self._queues.values(), *(q for _, q in self._event_queues)]
                )
                if not busy:
                    return
                await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ MessageBus

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Accept every envelope, or raise ``PublishError`` (then none was accepted)."""
        if self._closed:
            raise PublishError("bus is closed")
        if self._publish_failures:
            self._publish_failures -= 1
            raise PublishError("injected publish failure")
        published = self.published
        for envelope in envelopes:
            published.append(envelope)
            self._route(envelope)
            if self.duplicate_deliveries:
                self._route(envelope)
        keep = self.keep_published
        if keep is not None and len(published) >= 2 * keep:
            del published[:-keep]  # trimmed in halves: amortised O(1) a message

    def _route(self, envelope: Envelope) -> None:
        route = envelope.route
        if route is _EVENT_ROUTE:
            for pattern, queue in self._event_queues:
                if topic_matches(pattern, envelope.key):
                    queue.put(_Delivery(envelope))
            return
        if route is _DEAD_LETTER_ROUTE:
            self._queue(DEAD_LETTER_QUEUE).put(_Delivery(envelope))
            return
        target = self._queues.get((route, envelope.key))
        if target is None:
            target = self._queues[route, envelope.key] = _Queue()
        target.put(_Delivery(envelope))

    def _queue(self, address: tuple[RouteKind, str]) -> _Queue:
        queue = self._queues.get(address)
        if queue is None:
            queue = self._queues[address] = _Queue()
        return queue

    async def subscribe(
        self,
        route: RouteKind,
        key: str,
        handler: MessageHandler,
        *,
        concurrency: int = 1,
    ) -> _MemorySubscription:
        """Consume ``route``/``key`` with up to ``concurrency`` handlers at once."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if route is RouteKind.EVENT:
            queue = _Queue()
            self._event_queues.append((key, queue))
        elif route is RouteKind.DEAD_LETTER:
            queue = self._queue(DEAD_LETTER_QUEUE)
        else:
            queue = self._queue((route, key))
        queue.consumers += 1
        consumers = [_Consumer() for _ in range(concurrency)]
        outage = Outage(f"{route.value}/{key}")
        for consumer in consumers:
            consumer.task = asyncio.create_task(
                self._consume(queue, handler, consumer, outage),
                name=f"memory-bus:{route}:{key}",
            )
        subscription = _MemorySubscription(self, consumers)
        self._subscriptions.append(subscription)
        return subscription

    async def _consume(
        self, queue: _Queue, handler: MessageHandler, consumer: _Consumer, outage: Outage
    ) -> None:
        # The handler runs in this task (no task per message): close() cancels the consumer
        # only while it waits for a message, and waits while it handles one.
        try:
            while not consumer.stopping:
                delivery = await queue.get()
                consumer.busy = True
                self._in_flight += 1
                try:
                    await outage.handle(handler, delivery.envelope)
                except asyncio.CancelledError:
                    queue.put(delivery)  # not acked: back to the queue
                    raise
                except MessageDecodeError as exc:
                    self._poisoned(delivery, exc)
                except Exception as exc:  # noqa: BLE001 - a failing handler means redelivery
                    self._redeliver(queue, delivery, exc)
                finally:
                    self._in_flight -= 1
                    consumer.busy = False
        finally:
            queue.consumers -= 1

    def _poisoned(self, delivery: _Delivery, exc: MessageDecodeError) -> None:
        """Dead-letter at once a message that breaks the protocol: it cannot get better."""
        _log.error(
            "dead-lettering %s, which breaks the protocol: %s", delivery.envelope.message_id, exc
        )
        headers = dict(delivery.envelope.headers)
        headers[HEADER_REASON] = str(exc)
        self._queue(DEAD_LETTER_QUEUE).put(
            _Delivery(delivery.envelope.model_copy(update={"headers": headers}))
        )

    def _redeliver(self, queue: _Queue, delivery: _Delivery, exc: Exception) -> None:
        if delivery.count < self.max_deliveries:
            _log.warning(
                "handler failed for %s (delivery %d of %d), redelivering: %s",
                delivery.envelope.message_id,
                delivery.count,
                self.max_deliveries,
                exc,
            )
            queue.put(_Delivery(delivery.envelope, delivery.count + 1))
            return
        _log.error(
            "handler failed for %s %d times, dead-lettering it: %s",
            delivery.envelope.message_id,
            delivery.count,
            exc,
        )
        headers = dict(delivery.envelope.headers)
        headers["x-death-reason"] = f"delivery limit {self.max_deliveries} reached: {exc}"
        self._queue(DEAD_LETTER_QUEUE).put(
            _Delivery(delivery.envelope.model_copy(update={"headers": headers}))
        )

    async def close(self) -> None:
        """Stop every subscription."""
        self._closed = True
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
