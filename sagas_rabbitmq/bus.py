"""``RabbitBus``: the :class:`~sagas_abstractions.MessageBus` port over RabbitMQ with aio-pika.

One robust connection; one channel with publisher confirms for publishing, one for declaring
queues (a 406 on a redeclaration closes only that channel), and one per subscription (its QoS
is the subscription's prefetch). Every publish is bounded by a timeout, and a batch is
published pipelined: all messages go out, then all confirms are awaited together.

A batch goes out in one write (``sagas_rabbitmq._aiormq.BatchPublisher``, shared with
concurrent publishers): publishing through aio-pika one message at a time was the largest share
of the orchestrator's CPU (docs/performance.md). That relies on aiormq internals, so the bus
checks on connect that the installed aiormq has them (``sagas_rabbitmq._aiormq.check``): if it
does not, it publishes through aio-pika one message at a time and says so in a warning
(:attr:`RabbitBus.batch_publishing` tells which). This module itself uses aio-pika's public API
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Self
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
import aio_pika.exceptions

from sagas_abstractions import Envelope, PublishError, RouteKind, TransportError
from sagas_rabbitmq import _aiormq
from sagas_rabbitmq.consumer import RabbitSubscription
from sagas_rabbitmq.errors import BROKER_ERRORS, publish_error, transport_error
from sagas_rabbitmq.settings import TLS_FILE_OPTIONS, RabbitSettings
from sagas_rabbitmq.topology import Topology
from sagas_rabbitmq.wire import to_amqp

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from types import TracebackType

    from aio_pika.abc import (
        AbstractExchange,
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustQueue,
    )

    from sagas_abstractions import MessageHandler
    from sagas_core.outage import Outage

__all__ = ["RabbitBus"]

_log = logging.getLogger("sagas.rabbitmq")


class RabbitBus:
    """Publishes envelopes with confirms and consumes them with acks after handling.

    Create it with :meth:`connect` (or :meth:`from_settings`); the topology of
    ``docs/protocol.md`` is declared there, idempotently. Delivery is at least once: receivers
    deduplicate on ``message_id``.

    Example:
        ```python
        bus = await RabbitBus.connect("amqp://guest:guest@localhost/", prefix="shop")
        async with SagaRuntime(sagas=[order_saga], bus=bus, store=store):
            ...
        await bus.close()
        ```

    Attributes:
        settings: How it connects and names things.
        topology: The names and queue arguments in use.
    """

    messaging_system = "rabbitmq"
    """The OpenTelemetry ``messaging.system`` of this transport."""

    def __init__(self, settings: RabbitSettings, connection: AbstractRobustConnection) -> None:
        self.settings = settings
        self.topology = Topology(
            prefix=settings.prefix,
            quorum=settings.quorum,
            delivery_limit=settings.delivery_limit,
            group=settings.group,
        )
        self._connection = connection
        self._publish_channel: AbstractRobustChannel | None = None
        self._declare_channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._command_queues: dict[str, AbstractRobustQueue] = {}
        self._declare_lock = asyncio.Lock()
        # Ordinals of the open event subscriptions, per pattern: the n-th subscription to a
        # pattern in a process consumes queue n of that pattern (shared with the n-th of every
        # other process of the group); a closed subscription's ordinal is taken again.
        self._event_ordinals: dict[str, set[int]] = {}
        self._subscriptions: set[RabbitSubscription] = set()
        self._declared: set[str] = set()
        self._closed = False
        self._batch_publishing = False
        self._batch_acks = False
        self._publisher: _aiormq.BatchPublisher | None = None
        self.instance = settings.instance_id or uuid.uuid4().hex[:12]
        """This bus's name in its own reply addresses (see ``RabbitSettings.reply_affinity``)."""
        self._affinity: dict[str, str] = {}  # reply address -> this process's own address
        self.user = urlsplit(settings.url).username or None
        """The broker user of the connection, stamped as ``user_id`` on the replies it publishes
        (docs/protocol.md, section 5.2); ``None`` when the URL names none (EXTERNAL auth)."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "sagas",
        quorum: bool = True,
        delivery_limit: int = 5,
        prefetch: int | None = None,
        publish_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        close_timeout: float = 10.0,
        group: str = "default",
        connection_name: str | None = None,
        reply_affinity: bool = True,
        reply_affinity_ttl: float = 5.0,
        reply_affinity_expires: float = 300.0,
        instance_id: str | None = None,
    ) -> RabbitBus:
        """Connect to ``url`` and declare the topology (see :class:`RabbitSettings`).

        Raises:
            TransportError: The broker cannot be reached, or refuses the topology (for
                example, a queue exists with other arguments).
        """
        return await cls.from_settings(
            RabbitSettings(
                url=url,
                prefix=prefix,
                quorum=quorum,
                delivery_limit=delivery_limit,
                prefetch=prefetch,
                publish_timeout=publish_timeout,
                connect_timeout=connect_timeout,
                reconnect_interval=reconnect_interval,
                close_timeout=close_timeout,
                group=group,
                connection_name=connection_name,
                reply_affinity=reply_affinity,
                reply_affinity_ttl=reply_affinity_ttl,
                reply_affinity_expires=reply_affinity_expires,
                instance_id=instance_id,
            )
        )

    @classmethod
    async def from_settings(cls, settings: RabbitSettings) -> RabbitBus:
        """Connect with ``settings`` and declare the topology.

        Raises:
            TransportError: As for :meth:`connect`; also when a TLS file the URL names
                (``cafile=`` ...) cannot be read, or the broker's certificate is rejected.
        """
        where = _safe_url(settings.url)
        problem = _unreadable_tls_file(settings.url)
        if problem is not None:
            raise TransportError(f"RabbitMQ: connecting to {where} failed: {problem}")
        if _tls_query(settings.url).get("no_verify_ssl", ["0"])[-1] != "0":
            _log.warning(
                "TLS certificate verification is off for %s (no_verify_ssl): anyone on the "
                "path can pose as the broker",
                where,
            )
        try:
            connection = await aio_pika.connect_robust(
                settings.url,
                timeout=settings.connect_timeout,
                reconnect_interval=settings.reconnect_interval,
                client_properties={"connection_name": settings.client_name},
            )
        except BROKER_ERRORS as exc:
            raise transport_error(f"connecting to {where}", exc) from exc
        bus = cls(settings, connection)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                await bus._declare_topology()
        except BaseException as exc:
            with contextlib.suppress(*BROKER_ERRORS):
                await connection.close()
            if isinstance(exc, BROKER_ERRORS):
                raise transport_error("declaring the topology", exc) from exc
            raise
        return bus

    async def _declare_topology(self) -> None:
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        # Refuses an aiormq without what consuming needs; warns of any slower path it takes.
        internals = _aiormq.check(await self._publish_channel.get_underlay_channel())
        self._batch_publishing = internals.batch_publish
        self._batch_acks = internals.ack_batching
        self._publisher = _aiormq.BatchPublisher(
            self._publish_channel, self.topology, self.settings.publish_timeout
        )
        self._declare_channel = await self._connection.channel(publisher_confirms=False)
        # Exchanges are declared once, on the publishing channel, and their objects reused.
        for name, kind in self.topology.exchanges():
            self._exchanges[name] = await self._publish_channel.declare_exchange(
                name, aio_pika.ExchangeType(kind), durable=True
            )
        dead_letters = await self._declare_channel.declare_queue(
            self.topology.dead_letter_queue,
            durable=True,
            arguments=self.topology.dead_letter_queue_arguments(),
        )
        await dead_letters.bind(self.topology.dead_letter_exchange, routing_key="")
        self._declared.add(dead_letters.name)

    async def close(self) -> None:
        """Close every subscription (handlers in flight finish, bounded), then the connection."""
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(self.settings.close_timeout):
                await self._connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ introspection

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def subscriptions(self) -> tuple[RabbitSubscription, ...]:
        """The running subscriptions."""
        return tuple(self._subscriptions)

    @property
    def batch_publishing(self) -> bool:
        """Whether :meth:`publish` writes a batch at once (else through aio-pika, one by one)."""
        return self._batch_publishing

    @property
    def declared_queues(self) -> frozenset[str]:
        """Names of the queues this bus declared (for operators and test clean-up)."""
        return frozenset(self._declared)

    async def is_ready(self) -> bool:
        """Whether the connection is up and every subscription's consumer is registered.

        Readiness should turn red while this is false: after a reconnection, a consumer that did
        not come back is the failure mode to watch for.
        """
        if self._closed or self._connection.is_closed:
            return False
        for subscription in list(self._subscriptions):
            if not await subscription.is_consuming():
                return False
        return True

    # ------------------------------------------------------------------ publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish a batch, persistent and mandatory, and wait for every confirm.

        Raises:
            PublishError: At least one envelope was returned as unroutable, nacked, or not
                confirmed within ``publish_timeout`` (others may have been accepted;
                publishing the batch again is safe).
        """
        if self._closed:
            raise PublishError("RabbitMQ bus is closed; no message was published")
        if not envelopes:
            return
        envelopes = [self._outbound(envelope) for envelope in envelopes]
        for destination in dict.fromkeys(e.key for e in envelopes if e.route is RouteKind.COMMAND):
            try:
                await self._command_queue(destination)
            except BROKER_ERRORS as exc:
                failed = next(
                    e for e in envelopes if e.route is RouteKind.COMMAND and e.key == destination
                )
                raise publish_error(failed, exc) from exc
        results: Sequence[BaseException | None]
        if self._batch_publishing and self._publisher is not None:
            results = await self._publisher.publish(envelopes)
        else:
            results = await asyncio.gather(
                *(self._publish_one(envelope) for envelope in envelopes), return_exceptions=True
            )
        failures = [
            (envelope, result)
            for envelope, result in zip(envelopes, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if not failures:
            return
        for envelope, result in failures:
            if envelope.route is RouteKind.COMMAND and isinstance(
                result, aio_pika.exceptions.PublishError
            ):
                # The queue was deleted behind our back: declare it again next time.
                self._command_queues.pop(envelope.key, None)
        envelope, first = failures[0]
        error = publish_error(envelope, first)
        if len(failures) > 1:
            error.add_note(f"{len(failures) - 1} more of the {len(envelopes)} envelopes failed")
        raise error from first

    def _outbound(self, envelope: Envelope) -> Envelope:
        """``envelope`` as this connection publishes it (one copy at most, none if unchanged).

        A command whose replies this process consumes asks for them at its own address. A reply
        carries this connection's user as ``user_id``, which the broker validates, so an
        orchestrator can check who answered (``SAGAS_REPLY_USERS``). Nothing else carries one:
        an envelope that arrived with another publisher's user id (a reply dead-lettered by the
        runtime, say) would make the broker close the channel.
        """
        route = envelope.route
        changes: dict[str, str | None] = {}
        if route is RouteKind.COMMAND and envelope.reply_to is not None and self._affinity:
            own = self._affinity.get(envelope.reply_to)
            if own is not None:
                changes["reply_to"] = own
        user = self.user if route is RouteKind.REPLY else None
        if envelope.user_id != user:
            changes["user_id"] = user
        return envelope.model_copy(update=changes) if changes else envelope

    async def _publish_one(self, envelope: Envelope) -> None:
        exchange = self._exchanges[self.topology.exchange_for(envelope.route)]
        timeout = self.settings.publish_timeout
        # aio-pika waits for a reconnection without a bound before it even sends: bound it all.
        async with asyncio.timeout(timeout):
            await exchange.publish(
                to_amqp(envelope, user_id=envelope.user_id),
                routing_key=envelope.key,
                mandatory=self.topology.mandatory(envelope.route),
                timeout=timeout,
            )

    async def _republish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        channel = self._publish_channel
        if channel is None:
            raise TransportError("RabbitMQ bus is not connected")
        target = channel.default_exchange if exchange == "" else self._exchanges[exchange]
        async with asyncio.timeout(self.settings.publish_timeout):
            await target.publish(
                message, routing_key=routing_key, timeout=self.settings.publish_timeout
            )

    async def _command_queue(self, destination: str) -> None:
        """Declare and bind a destination's queue once, so commands sent early are kept."""
        if destination in self._command_queues:
            return
        async with self._declare_lock:
            if destination in self._command_queues:
                return
            channel = self._declare_channel
            if channel is None:
                raise TransportError("RabbitMQ bus is not connected")
            async with asyncio.timeout(self.settings.publish_timeout):
                queue = await self._declare(channel, RouteKind.COMMAND, destination)
            self._command_queues[destination] = queue

    # ------------------------------------------------------------------ consuming

    async def _declare(
        self, channel: AbstractRobustChannel, route: RouteKind, key: str, ordinal: int = 1
    ) -> AbstractRobustQueue:
        topology = self.topology
        arguments = topology.queue_arguments()
        if route is RouteKind.COMMAND:
            name, exchange, binding = topology.command_queue(key), topology.commands_exchange, key
        elif route is RouteKind.REPLY:
            name, exchange, binding = topology.reply_queue(key), topology.replies_exchange, key
        elif route is RouteKind.EVENT:
            name = topology.event_queue(key, ordinal)
            exchange, binding = topology.events_exchange, key
        else:
            name, exchange, binding = (
                topology.dead_letter_queue,
                topology.dead_letter_exchange,
                "",
            )
            arguments = topology.dead_letter_queue_arguments()
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(exchange, routing_key=binding)
        self._declared.add(name)
        return queue

    async def subscribe(
        self,
        route: RouteKind,
        key: str,
        handler: MessageHandler,
        *,
        concurrency: int = 1,
    ) -> RabbitSubscription:
        """Consume ``route``/``key`` on a channel of its own with up to ``concurrency`` handlers.

        The queue is declared (and bound) if needed; the channel's prefetch is ``prefetch`` or
        ``concurrency``. A handler that returns acks its message; one that raises hands it back,
        up to ``delivery_limit`` times, then it goes to the dead-letter queue.

        Raises:
            ValueError: ``concurrency`` is below one.
            TransportError: The bus is closed, or the broker refused the queue or consumer.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self._closed:
            raise TransportError("RabbitMQ bus is closed; cannot subscribe")

        ordinal = self._take_ordinal(key) if route is RouteKind.EVENT else 1

        async def declare(channel: AbstractRobustChannel) -> AbstractRobustQueue:
            return await self._declare(channel, route, key, ordinal)

        def closed(subscription: RabbitSubscription) -> None:
            self._subscriptions.discard(subscription)
            if route is RouteKind.EVENT:
                self._release_ordinal(key, ordinal)

        try:
            subscription = await self._open_subscription(
                route,
                key,
                handler,
                concurrency,
                declare=declare,
                on_closed=closed,
                what=f"{route.value}/{key}",
            )
        except BaseException:
            if route is RouteKind.EVENT:
                self._release_ordinal(key, ordinal)
            raise
        _log.debug("consuming %s with concurrency %d", subscription.queue_name, concurrency)
        if route is RouteKind.REPLY and self.settings.reply_affinity:
            try:
                await self._subscribe_own_replies(subscription, key, handler, concurrency)
            except BaseException:
                await subscription.close()
                raise
        return subscription

    def _take_ordinal(self, pattern: str) -> int:
        """The lowest ordinal no open subscription to ``pattern`` in this process holds."""
        taken = self._event_ordinals.setdefault(pattern, set())
        ordinal = 1
        while ordinal in taken:
            ordinal += 1
        taken.add(ordinal)
        return ordinal

    def _release_ordinal(self, pattern: str, ordinal: int) -> None:
        taken = self._event_ordinals.get(pattern)
        if taken is not None:
            taken.discard(ordinal)
            if not taken:
                del self._event_ordinals[pattern]

    async def _open_subscription(
        self,
        route: RouteKind,
        key: str,
        handler: MessageHandler,
        concurrency: int,
        *,
        declare: Callable[[AbstractRobustChannel], Awaitable[AbstractRobustQueue]],
        on_closed: Callable[[RabbitSubscription], None],
        what: str,
        slots: asyncio.Semaphore | None = None,
        outage: Outage | None = None,
    ) -> RabbitSubscription:
        """A consumer on a channel of its own, of the queue ``declare`` declares on it."""
        channel: AbstractRobustChannel | None = None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                channel = await self._connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.settings.prefetch or concurrency)
                subscription = RabbitSubscription(
                    channel=channel,
                    queue=await declare(channel),
                    route=route,
                    key=key,
                    handler=handler,
                    concurrency=concurrency,
                    topology=self.topology,
                    republish=self._republish,
                    close_timeout=self.settings.close_timeout,
                    on_closed=on_closed,
                    retry_interval=self.settings.reconnect_interval,
                    batch_acks=self._batch_acks,
                    slots=slots,
                    outage=outage,
                )
                await subscription.start()
        except BROKER_ERRORS as exc:
            if channel is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()
            raise transport_error(f"subscribing to {what}", exc) from exc
        self._subscriptions.add(subscription)
        return subscription

    async def _subscribe_own_replies(
        self, shared: RabbitSubscription, key: str, handler: MessageHandler, concurrency: int
    ) -> None:
        """Consume this process's own reply queue too, with the same handler and bound.

        Commands this bus publishes with ``reply_to=key`` then ask for their replies at
        ``<key>@<instance>`` (see ``RabbitSettings.reply_affinity``). A reply waits there at
        most ``reply_affinity_ttl`` seconds, then moves to the shared queue of ``key``.
        """
        topology, settings = self.topology, self.settings
        own = topology.affinity_key(key, self.instance)

        async def declare(channel: AbstractRobustChannel) -> AbstractRobustQueue:
            queue = await channel.declare_queue(
                topology.affinity_queue(key, self.instance),
                durable=True,
                arguments=topology.affinity_arguments(
                    key, ttl=settings.reply_affinity_ttl, expires=settings.reply_affinity_expires
                ),
            )
            await queue.bind(topology.replies_exchange, routing_key=own)
            self._declared.add(queue.name)
            consumers = queue.declaration_result.consumer_count
            if consumers and settings.instance_id is not None:
                _log.warning(
                    "%d other process(es) consume %s: instance_id %r is not unique; they share "
                    "its replies (safe, but each loses the affinity's benefit)",
                    consumers,
                    queue.name,
                    settings.instance_id,
                )
            return queue

        def closed(subscription: RabbitSubscription) -> None:
            # Replies asked for from now on go to the shared queue.
            if self._affinity.get(key) == own:
                del self._affinity[key]
            self._subscriptions.discard(subscription)

        companion = await self._open_subscription(
            RouteKind.REPLY,
            key,  # the address asked for: its replies look the same on both queues
            handler,
            concurrency,
            declare=declare,
            on_closed=closed,
            what=f"{RouteKind.REPLY.value}/{own}",
            slots=shared.slots,
            outage=shared.outage,
        )
        shared.add_companion(companion)
        self._affinity[key] = own
        _log.debug("consuming %s (this process's own replies)", companion.queue_name)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages (the TLS options stay: they name files)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _tls_query(url: str) -> dict[str, list[str]]:
    parts = urlsplit(url)
    return parse_qs(parts.query) if parts.scheme == "amqps" else {}


def _unreadable_tls_file(url: str) -> str | None:
    """Which TLS file of ``url`` cannot be read, and why (``ssl`` would not name it)."""
    for option, values in _tls_query(url).items():
        if option not in TLS_FILE_OPTIONS:
            continue
        path = values[-1]
        if not os.access(path, os.R_OK):
            reason = "is not readable" if Path(path).exists() else "does not exist"
            return f"{option}={path} {reason} (the TLS options of the URL name local files)"
    return None
