"""One subscription: its own channel, QoS, a consumer, and handlers with bounded concurrency.

Handlers run in tasks the subscription owns, not in aiormq's consumer tasks: closing a channel
(say, when the connection drops) cancels aiormq's tasks, and a handler cancelled halfway through
its database transaction is worse than one that finishes and then fails to ack (the broker
redelivers that message and the receiver deduplicates it).

The consumer is registered on the aiormq channel itself (``sagas_rabbitmq._aiormq.Consumer``),
not through aio-pika's ``Queue.consume``, which costs an ``IncomingMessage`` and a task per
delivery: aiormq's task starts the handler's task directly. The subscription consumes again,
with the same tag, whenever the robust channel reopens (after a reconnection), once the channel
has declared the queue again; and when the broker cancels the consumer (its queue was deleted,
say) it declares the queue again and consumes again, retrying until it can, as aio-pika does
for the consumers it knows.

A handler failure that belongs to the message is treated by what it says: a
``MessageDecodeError`` (the message breaks the protocol, and will every time) dead-letters a copy
at once, with the error in ``x-dead-letter-reason``, and acks the original; any other failure
hands it back to be counted against the delivery limit. An ``Unavailable`` (the store cannot be
reached, or a reply could not be published while the connection recovers) is the worker's
failure, not the message's: the delivery is held, uncounted, until the handler gets through (see
:class:`~sagas_core.outage.Outage`).

Acks of the handlers that finish together (a group commit acks its whole batch) go to the
socket in one write (``sagas_rabbitmq._aiormq.AckWriter``). Everything below aio-pika's public
API lives in ``sagas_rabbitmq._aiormq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aio_pika

from sagas_abstractions import Envelope, MessageDecodeError, RouteKind
from sagas_core.codec import HEADER_REASON
from sagas_core.outage import Outage
from sagas_rabbitmq._aiormq import AckWriter, Consumer, ack_one, nack
from sagas_rabbitmq.errors import BROKER_ERRORS
from sagas_rabbitmq.topology import (
    DEAD_LETTER_REASON_HEADER,
    DELIVERY_COUNT_HEADER,
    ROUTING_KEY_HEADER,
    Topology,
)
from sagas_rabbitmq.wire import from_amqp, header_text, to_amqp

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue

    from sagas_abstractions import MessageHandler
    from sagas_rabbitmq._aiormq import Delivery

__all__ = ["RabbitSubscription", "Republish"]

_log = logging.getLogger("sagas.rabbitmq.consumer")

Republish = Callable[[str, str, aio_pika.Message], Awaitable[None]]
"""Publishes ``message`` to exchange ``[0]`` with routing key ``[1]``, confirmed, or raises."""

_SETTLE_TIMEOUT = 5.0


def _poisoned_copy(message: Delivery, reason: str) -> aio_pika.Message:
    """A copy of ``message`` as it came (properties, headers, body) plus the reason header."""
    properties = message.header.properties
    headers = dict(properties.headers or {})
    headers[HEADER_REASON] = reason
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        type=properties.message_type,
        reply_to=properties.reply_to,
        timestamp=properties.timestamp,
    )


def _routing_key(message: Delivery) -> str:
    """The routing key the message was first published with (a classic retry keeps it)."""
    original = (message.header.properties.headers or {}).get(ROUTING_KEY_HEADER)
    if original:
        return header_text(original)
    return message.routing_key or ""


class RabbitSubscription:
    """A running consumer of one queue (implements :class:`~sagas_abstractions.Subscription`).

    It keeps strong references to its channel and queue so the robust connection can restore
    them after a reconnection (a queue object that was garbage-collected is silently never
    declared again); it then consumes again itself, under the same consumer tag.

    Attributes:
        route: The route consumed.
        key: The key (destination, reply address, topic pattern) consumed.
        queue_name: The queue consumed.
        concurrency: Handlers run at once, at most.
        handled: Messages acked after their handler returned.
        failed: Handler failures (each one a redelivery or a dead-lettering).
    """

    def __init__(
        self,
        *,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        route: RouteKind,
        key: str,
        handler: MessageHandler,
        concurrency: int,
        topology: Topology,
        republish: Republish,
        close_timeout: float,
        on_closed: Callable[[RabbitSubscription], None],
        retry_interval: float = 1.0,
        batch_acks: bool = True,
        slots: asyncio.Semaphore | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.route = route
        self.key = key
        self.queue_name = queue.name
        self.concurrency = concurrency
        self.handled = 0
        self.failed = 0
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._topology = topology
        self._republish = republish
        self._close_timeout = close_timeout
        self._retry_interval = retry_interval
        self._recovery: asyncio.Task[None] | None = None
        self._on_closed = on_closed
        # Shared with a companion subscription (see add_companion): one bound for both.
        self._slots = slots or asyncio.Semaphore(concurrency)
        self._outage = outage or Outage(self.queue_name)
        self._companions: list[RabbitSubscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer = Consumer(channel, self.queue_name, self._on_message, self._on_cancelled)
        self._closing = False
        # Acks written together; one at a time on an aiormq without what that needs.
        self._acks = AckWriter(self.queue_name) if batch_acks else None
        self._task_name = f"sagas-rabbitmq:{self.queue_name}"

    @property
    def in_flight(self) -> int:
        """Messages received and not settled yet."""
        return len(self._tasks)

    async def start(self) -> None:
        """Start consuming (manual acks)."""
        await self._consumer.consume()
        self._channel.reopen_callbacks.add(self._on_reopen)

    def _on_cancelled(self) -> None:
        """The broker cancelled the consumer (its queue was deleted, say)."""
        if self._closing:
            return
        _log.warning("the broker cancelled the consumer of %s; consuming again", self.queue_name)
        self._start_recovery()

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name=self._task_name)

    async def _recover(self) -> None:
        """Declare the queue (and its bindings) again and consume again, until it works."""
        while not self._closing:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await self._queue.restore()
                    await self._consumer.consume()
            except BROKER_ERRORS as exc:
                _log.warning(
                    "consuming %s again failed (%s); retrying in %.1fs",
                    self.queue_name,
                    exc,
                    self._retry_interval,
                )
                await asyncio.sleep(self._retry_interval)
            else:
                _log.info("consuming %s again", self.queue_name)
                return

    async def _on_reopen(self, _channel: object) -> None:
        """Consume again on the reopened channel (it has declared and bound the queue again)."""
        if self._closing:
            return
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._consumer.consume()
        except BROKER_ERRORS as exc:
            # aio-pika ignores what its reopen callbacks raise: retry here until it works.
            _log.warning(
                "consuming %s again after a reconnection failed (%s)", self.queue_name, exc
            )
            self._start_recovery()

    async def is_consuming(self) -> bool:
        """Whether the broker currently knows this consumer (false while reconnecting)."""
        return not self._closing and await self._consumer.is_consuming()

    # ------------------------------------------------------------------ deliveries

    async def _on_message(self, message: Delivery) -> None:
        if self._closing:
            await self._settle(nack(message), message, "nack")
            return
        task = asyncio.create_task(self._handle(message), name=self._task_name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _envelope_key(self, message: Delivery) -> str:
        if self.route in (RouteKind.EVENT, RouteKind.DEAD_LETTER):
            return _routing_key(message) or self.key
        return self.key

    async def _handle(self, message: Delivery) -> None:
        async with self._slots:
            try:
                envelope = from_amqp(message, self.route, self._envelope_key(message))
            except MessageDecodeError as exc:
                await self._poisoned(message, exc)
                return
            try:
                await self._outage.handle(self._handler, envelope)
            except asyncio.CancelledError:
                # Cancelled by close() after its grace period: hand the message back.
                with contextlib.suppress(*BROKER_ERRORS):
                    async with asyncio.timeout(1.0):
                        await nack(message)
                raise
            except MessageDecodeError as exc:
                self.failed += 1
                await self._poisoned(message, exc)
                return
            except Exception as exc:  # noqa: BLE001 - a failing handler means redelivery
                self.failed += 1
                await self._failed(message, envelope, exc)
                return
            if await self._ack(message):
                self.handled += 1

    async def _ack(self, message: Delivery) -> bool:
        if self._acks is None:
            return await self._settle(ack_one(message), message, "ack")
        return await self._acks.ack(message)

    async def _settle(self, action: Awaitable[Any], message: Delivery, what: str) -> bool:
        try:
            async with asyncio.timeout(_SETTLE_TIMEOUT):
                await action
        except BROKER_ERRORS as exc:
            # The channel went away (a reconnection): the broker redelivers the message, and
            # the receiver deduplicates it by message_id.
            _log.warning(
                "%s of %s on %s lost (%s); the broker will redeliver it",
                what,
                message.header.properties.message_id,
                self.queue_name,
                exc,
            )
            return False
        return True

    async def _poisoned(self, message: Delivery, exc: MessageDecodeError) -> None:
        """Dead-letter a message that breaks the protocol now: redelivering cannot help.

        Published to the dead-letter exchange rather than rejected, for every queue type: a
        rejected message carries only the broker's reason (``rejected``), and a reply rejected
        in this process's own reply queue would be dead-lettered into the group's queue, not
        to the dead-letter queue, and delivered again there.
        """
        _log.error(
            "dead-lettering %s from %s, which breaks the protocol: %s",
            message.header.properties.message_id,
            self.queue_name,
            exc,
        )
        copy = _poisoned_copy(message, header_text(str(exc)))
        await self._replace(
            message, self._topology.dead_letter_exchange, _routing_key(message), copy
        )

    async def _replace(
        self, message: Delivery, exchange: str, routing_key: str, copy: aio_pika.Message
    ) -> None:
        """Publish ``copy`` of ``message``, then ack the original (or, failing that, requeue it)."""
        try:
            await self._republish(exchange, routing_key, copy)
        except Exception:  # noqa: BLE001 - any failure: keep the original instead
            _log.exception("republishing %s failed; requeueing it", copy.message_id)
            await self._settle(nack(message), message, "nack")
            return
        await self._ack(message)

    @property
    def outage(self) -> Outage:
        """The outage state of this subscription's store (a companion shares it)."""
        return self._outage

    async def _failed(self, message: Delivery, envelope: Envelope, exc: Exception) -> None:
        if self._topology.quorum:
            # The quorum queue counts deliveries and dead-letters past x-delivery-limit.
            _log.warning(
                "handler failed for %s on %s (delivery count %s), handing it back: %s",
                envelope.message_id,
                self.queue_name,
                envelope.headers.get("x-delivery-count", "0"),
                exc,
            )
            await self._settle(nack(message), message, "nack")
            return
        await self._failed_classic(message, envelope, exc)

    async def _failed_classic(self, message: Delivery, envelope: Envelope, exc: Exception) -> None:
        # Classic queues do not count deliveries: republish a copy carrying the count (at the
        # tail of the queue), or, past the limit, to the dead-letter exchange with the reason.
        # Only then ack the original, so a failure in between loses nothing.
        headers = dict(envelope.headers)
        count = int(headers.get(DELIVERY_COUNT_HEADER, "0") or "0")
        if count >= self._topology.delivery_limit:
            _log.error(
                "handler failed for %s on %s %d times, dead-lettering it: %s",
                envelope.message_id,
                self.queue_name,
                count + 1,
                exc,
            )
            headers[DEAD_LETTER_REASON_HEADER] = header_text(
                f"delivery limit {self._topology.delivery_limit} reached in queue "
                f"{self.queue_name}: {type(exc).__name__}: {exc}"
            )
            exchange, routing_key = self._topology.dead_letter_exchange, _routing_key(message)
        else:
            _log.warning(
                "handler failed for %s on %s (redelivery %d of %d): %s",
                envelope.message_id,
                self.queue_name,
                count + 1,
                self._topology.delivery_limit,
                exc,
            )
            headers[DELIVERY_COUNT_HEADER] = str(count + 1)
            headers[ROUTING_KEY_HEADER] = _routing_key(message)
            exchange, routing_key = "", self.queue_name
        await self._replace(message, exchange, routing_key, to_amqp(envelope, headers=headers))

    # ------------------------------------------------------------------ closing

    @property
    def slots(self) -> asyncio.Semaphore:
        """The bound on handlers at once (a companion shares it)."""
        return self._slots

    def add_companion(self, companion: RabbitSubscription) -> None:
        """Close ``companion`` along with this subscription (a second queue, same handler)."""
        self._companions.append(companion)

    async def close(self) -> None:
        """Cancel the consumer, let handlers in flight finish (bounded), close the channel.

        Companions (see :meth:`add_companion`) close at the same time.
        """
        await asyncio.gather(self._close_own(), *(c.close() for c in self._companions))

    async def _close_own(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._channel.reopen_callbacks.discard(self._on_reopen)
            if self._recovery is not None:
                self._recovery.cancel()
                await asyncio.gather(self._recovery, return_exceptions=True)
            if self._consumer.tag is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    async with asyncio.timeout(self._close_timeout):
                        await self._consumer.cancel()
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    _log.warning(
                        "%d handler(s) on %s did not finish in %.1fs; cancelled, to be redelivered",
                        len(pending),
                        self.queue_name,
                        self._close_timeout,
                    )
                    await asyncio.gather(*pending, return_exceptions=True)
            if self._acks is not None:
                await self._acks.flush()
            with contextlib.suppress(*BROKER_ERRORS):
                async with asyncio.timeout(self._close_timeout):
                    await self._channel.close()
        finally:
            self._on_closed(self)
