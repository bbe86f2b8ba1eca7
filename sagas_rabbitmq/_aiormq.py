"""Every use of aiormq's internals in ``sagas_rabbitmq``, behind a small interface.

aio-pika's public API costs more per message than the transport's hot paths can afford (see
docs/performance.md, "What was done in round 2"), so three of them go one level down, onto the
aiormq channel under an aio-pika robust channel:

* :class:`BatchPublisher` writes a batch in one write under one acquisition of the channel
  lock, with one confirmation future per delivery tag registered on the channel exactly as
  ``aiormq.Channel.basic_publish`` registers them, so aiormq's reader settles them (ack, nack,
  return, channel closed) as it would its own. ``basic_publish`` costs a lock, a timeout, a
  write and a drain per message, and aio-pika a ``Message`` and a task per message on top.
* :class:`AckWriter` writes the acks of the handlers that finish together as one frame write:
  aiormq writes and drains each ack on its own, one system call per message.
* :class:`Consumer` registers a consumer on the aiormq channel itself, not through aio-pika's
  ``Queue.consume``, which wraps each delivery in an ``IncomingMessage`` and a task of its own
  before the callback even runs. It hears of the broker cancelling it, and consumes again
  under the same tag when asked (after a reconnection).

Nothing else in the package goes below aio-pika's public API, except for aiormq's public
exceptions and its delivered-message type (:data:`Delivery`).

What this module relies on is listed in :data:`INTERNALS`. :func:`inspect_channel` checks a
channel for all of it; :func:`check` does so when ``RabbitBus`` connects: consuming without its
internals is refused (:class:`AiormqUnsupportedError`), and without those of batch publishing or ack
batching the bus takes aio-pika's slower path for that, with a warning naming what is missing.
``tests/unit/test_aiormq_internals.py`` fails, naming what is gone, when the installed aiormq no
longer has any of it; docs/operations.md, "The aiormq internals", says how to vet a new aiormq.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib.metadata
import inspect
import logging
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import aiormq
import aiormq.exceptions
import pamqp.frame
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.commands import Basic

from sagas_abstractions import TransportError
from sagas_rabbitmq.errors import BROKER_ERRORS
from sagas_rabbitmq.wire import content_header_frame

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    from aio_pika.abc import AbstractRobustChannel

    from sagas_abstractions import Envelope
    from sagas_rabbitmq.topology import Topology

__all__ = [
    "INTERNALS",
    "SUPPORTED_AIORMQ",
    "AckWriter",
    "AiormqUnsupportedError",
    "BatchPublisher",
    "Consumer",
    "Delivery",
    "Feature",
    "Internal",
    "Internals",
    "ack_one",
    "check",
    "inspect_channel",
    "installed_aiormq",
    "nack",
    "supports_ack_writer",
    "supports_batch_publish",
]

_log = logging.getLogger("sagas.rabbitmq")
_ack_log = logging.getLogger("sagas.rabbitmq.consumer")  # where the subscription logs

SUPPORTED_AIORMQ = ">=7.2.4,<7.3"
"""The aiormq versions this module is tested with (pyproject.toml bounds the extra to them)."""

Delivery = DeliveredMessage
"""A message as aiormq delivers it to a :class:`Consumer`'s callback."""

_SETTLE_TIMEOUT = 5.0
_MAX_ROUTING_KEY = 255
_PUBLISH_FRAME_CACHE = 1024
"""Marshalled ``Basic.Publish`` frames kept (one per exchange, routing key and channel)."""


def installed_aiormq() -> str:
    """The installed aiormq's version, for messages."""
    try:
        return importlib.metadata.version("aiormq")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "(version unknown)"


# ---------------------------------------------------------------------- capability check


class Feature(enum.Enum):
    """What an internal is needed for."""

    BATCH_PUBLISH = "batch publishing"
    ACK_BATCHING = "ack batching"
    CONSUMING = "consuming"


@dataclasses.dataclass(frozen=True, slots=True)
class Internal:
    """One thing of aiormq's this module relies on, and how to tell it is there."""

    feature: Feature
    name: str
    present: Callable[[object], bool]


def _attribute(name: str, kind: type | tuple[type, ...]) -> Callable[[object], bool]:
    def present(channel: object) -> bool:
        return isinstance(getattr(channel, name, None), kind)

    return present


def _method(name: str) -> Callable[[object], bool]:
    def present(channel: object) -> bool:
        return callable(getattr(channel, name, None))

    return present


def _static(name: str) -> Callable[[object], bool]:
    """Present without being evaluated (``Channel.lock`` builds a context manager when read)."""

    def present(channel: object) -> bool:
        return inspect.getattr_static(channel, name, None) is not None

    return present


def _reads(method: str, name: str) -> Callable[[object], bool]:
    """Whether ``method`` of the channel's class reads attribute ``name``.

    Registering a confirmation in ``confirmations`` only works while aiormq's reader settles
    the futures it finds there: a renamed dict would leave every publish waiting for its timeout.
    """

    def present(channel: object) -> bool:
        function = getattr(type(channel), method, None)
        code = getattr(function, "__code__", None)
        return code is not None and name in code.co_names

    return present


def _is_channel(channel: object) -> bool:
    return isinstance(channel, aiormq.Channel)


def _channel_frame_fields(_: object) -> bool:
    try:
        fields = {f.name for f in dataclasses.fields(ChannelFrame)}
    except TypeError:
        return False
    return fields == {"payload", "should_close", "drain_future"}


def _channel_frame_marshall(_: object) -> bool:
    return callable(getattr(ChannelFrame, "marshall", None))


def _on(name: str) -> Callable[[object], bool]:
    def present(channel: object) -> bool:
        return getattr(channel, name, None) is True

    return present


_P, _A, _C = Feature.BATCH_PUBLISH, Feature.ACK_BATCHING, Feature.CONSUMING

INTERNALS: tuple[Internal, ...] = (
    *(Internal(feature, "aiormq.Channel", _is_channel) for feature in Feature),
    Internal(_P, "ChannelFrame(payload, should_close, drain_future)", _channel_frame_fields),
    Internal(_P, "Channel.lock", _static("lock")),
    Internal(_P, "Channel.create_future()", _method("create_future")),
    Internal(_P, "Channel.number: int", _attribute("number", int)),
    Internal(_P, "Channel.delivery_tag: int", _attribute("delivery_tag", int)),
    Internal(_P, "Channel.confirmations: dict", _attribute("confirmations", dict)),
    Internal(
        _P, "Channel.message_id_delivery_tag: dict", _attribute("message_id_delivery_tag", dict)
    ),
    Internal(_P, "Channel.max_content_size: int", _attribute("max_content_size", int)),
    Internal(_P, "Channel.write_queue: asyncio.Queue", _attribute("write_queue", asyncio.Queue)),
    Internal(
        _P,
        "Channel._on_confirm_frame reads confirmations",
        _reads("_on_confirm_frame", "confirmations"),
    ),
    Internal(
        _P,
        "Channel._on_return_frame reads message_id_delivery_tag",
        _reads("_on_return_frame", "message_id_delivery_tag"),
    ),
    Internal(_P, "Channel.publisher_confirms is on", _on("publisher_confirms")),
    Internal(_P, "Channel.on_return_raises is on", _on("on_return_raises")),
    Internal(_A, "ChannelFrame.marshall()", _channel_frame_marshall),
    Internal(_A, "Channel.number: int", _attribute("number", int)),
    Internal(_A, "Channel.write_queue: asyncio.Queue", _attribute("write_queue", asyncio.Queue)),
    Internal(_A, "Channel.is_closed: bool", _attribute("is_closed", bool)),
    Internal(_C, "Channel.basic_consume()", _method("basic_consume")),
    Internal(_C, "Channel.basic_cancel()", _method("basic_cancel")),
    Internal(_C, "Channel.consumers: dict", _attribute("consumers", dict)),
    Internal(
        _C,
        "Channel.on_consumer_cancel_callbacks: set",
        _attribute("on_consumer_cancel_callbacks", set),
    ),
)
"""Everything of aiormq's this module relies on, by feature (a channel opened with publisher
confirms and ``on_return_raises`` has all of it with a supported aiormq)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Internals:
    """What a channel lacks of :data:`INTERNALS`, by feature (nothing, with a supported aiormq).

    Attributes:
        version: The installed aiormq's version.
        missing: The names of the missing internals, by the feature that needs them.
    """

    version: str
    missing: dict[Feature, tuple[str, ...]]

    @property
    def batch_publish(self) -> bool:
        """Whether :class:`BatchPublisher` can publish on the channel."""
        return not self.missing.get(Feature.BATCH_PUBLISH)

    @property
    def ack_batching(self) -> bool:
        """Whether :class:`AckWriter` can write acks on channels like this one."""
        return not self.missing.get(Feature.ACK_BATCHING)

    @property
    def consuming(self) -> bool:
        """Whether :class:`Consumer` can consume on channels like this one."""
        return not self.missing.get(Feature.CONSUMING)

    def describe(self, feature: Feature) -> str:
        """What ``feature`` lacks, in a sentence naming the versions that have it."""
        return (
            f"aiormq {self.version} lacks what {feature.value} relies on: "
            f"{', '.join(self.missing.get(feature, ()))} (sagas_rabbitmq is tested with "
            f"aiormq{SUPPORTED_AIORMQ}; see docs/operations.md, 'The aiormq internals')"
        )


def inspect_channel(channel: object) -> Internals:
    """What ``channel`` (an aiormq channel with publisher confirms) lacks of :data:`INTERNALS`."""
    missing: dict[Feature, list[str]] = {}
    for internal in INTERNALS:
        if not internal.present(channel):
            missing.setdefault(internal.feature, []).append(internal.name)
    return Internals(
        version=installed_aiormq(),
        missing={feature: tuple(names) for feature, names in missing.items()},
    )


def supports_batch_publish(channel: object) -> bool:
    """Whether ``channel`` has every internal :class:`BatchPublisher` relies on."""
    return inspect_channel(channel).batch_publish


def supports_ack_writer(channel: object) -> bool:
    """Whether ``channel`` has every internal :class:`AckWriter` relies on."""
    return inspect_channel(channel).ack_batching


class AiormqUnsupportedError(TransportError):
    """The installed aiormq lacks an internal that ``sagas_rabbitmq`` cannot do without.

    A :class:`~sagas_abstractions.TransportError`, as everything ``RabbitBus.connect`` raises,
    but not one of the client's errors (``BROKER_ERRORS`` includes ``RuntimeError``), so that
    connect raises it as it is rather than as a failed topology declaration.
    """


def check(channel: object) -> Internals:
    """The capability check on connect: refuse, or warn about, a channel's missing internals.

    Raises:
        AiormqUnsupportedError: ``channel`` lacks what :class:`Consumer` needs; the message
            names the missing internals and the supported aiormq versions.
    """
    internals = inspect_channel(channel)
    if not internals.consuming:
        raise AiormqUnsupportedError(
            f"{internals.describe(Feature.CONSUMING)}: install a supported aiormq "
            f"(pip install 'aiormq{SUPPORTED_AIORMQ}')"
        )
    # A slower path exists for these: take it, but say so on every connect, so that the
    # slowdown of an untested aiormq is seen rather than guessed at.
    if not internals.batch_publish:
        _log.warning(
            "%s; publishing one message at a time through aio-pika instead (slower)",
            internals.describe(Feature.BATCH_PUBLISH),
        )
    if not internals.ack_batching:
        _log.warning(
            "%s; acking one message at a time instead (slower)",
            internals.describe(Feature.ACK_BATCHING),
        )
    return internals


# ---------------------------------------------------------------------- publishing


class _Outgoing(NamedTuple):
    """One message ready for the wire: its marshalled method and header frames, and body."""

    message_id: str
    frames: list[bytes]
    body: bytes


@dataclasses.dataclass(slots=True, eq=False)
class _Write:
    """A publisher's batch waiting to be written, and where its confirmations go."""

    channel: aiormq.Channel
    messages: list[_Outgoing]
    confirmations: asyncio.Future[list[asyncio.Future[Any]]]
    abandoned: bool = False


class BatchPublisher:
    """Publishes batches of envelopes on a robust channel, each batch in one write.

    The channel must be opened with publisher confirms and ``on_return_raises``, on an aiormq
    that :func:`supports_batch_publish`. Concurrent publishers share writes too: the batches
    that queue up while one is being written go out together in the next write (a participant
    publishes one reply per command from many handlers at once, and a socket write each was
    the largest part of its CPU). A publisher alone writes at once, without waiting for company.
    """

    def __init__(self, channel: AbstractRobustChannel, topology: Topology, timeout: float) -> None:
        self._channel = channel
        self._topology = topology
        self._timeout = timeout
        self._publish_frames: dict[tuple[int, str, str, bool], bytes] = {}
        self._writes: list[_Write] = []
        self._write_lock = asyncio.Lock()

    async def publish(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Publish ``envelopes`` persistent and confirmed; the error of each, if any.

        Within the timeout given at construction, everything included (waiting for a
        reconnection, the write, the confirms). An error is what ``basic_publish`` would have
        raised for that message: ``aiormq.exceptions.PublishError`` (returned as unroutable),
        ``DeliveryError`` (nacked), ``ChannelInvalidStateError`` and the like (the channel
        went), ``TimeoutError`` (not confirmed in time), ``ValueError`` or ``TypeError`` (the
        message cannot be marshalled).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        results: list[BaseException | None] = [None] * len(envelopes)
        try:
            # aio-pika waits for a reconnection without a bound: bound it, and the write.
            async with asyncio.timeout_at(deadline):
                underlay = await self._underlay()
                outgoing: list[_Outgoing] = []
                positions: list[int] = []
                for position, envelope in enumerate(envelopes):
                    try:
                        outgoing.append(self._frames(underlay.number, envelope))
                    except (ValueError, TypeError) as exc:  # this one only, as aiormq would
                        results[position] = exc
                    else:
                        positions.append(position)
                confirmations = await self._write(underlay, outgoing)
        except Exception as exc:  # noqa: BLE001 - as gather(return_exceptions=True) would
            return [exc] * len(envelopes)
        pending = [c for c in confirmations if not c.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            for confirmation in late:
                # As aiormq's own timeout does; its reader then ignores the late confirm.
                confirmation.cancel()
        for position, confirmation in zip(positions, confirmations, strict=True):
            results[position] = (
                TimeoutError("not confirmed within publish_timeout")
                if confirmation.cancelled()
                else confirmation.exception()
            )
        return results

    async def _underlay(self) -> aiormq.Channel:
        """The aiormq channel under the robust channel (a new one after a reconnection)."""
        channel = self._channel
        if channel.is_closed:
            # As aio-pika's Exchange.publish: fail now rather than wait for a reconnection.
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        if not isinstance(underlay, aiormq.Channel):  # pragma: no cover - check() vetted it
            raise TransportError(f"not an aiormq channel: {underlay!r}")
        return underlay

    def _frames(self, channel_number: int, envelope: Envelope) -> _Outgoing:
        """One message marshalled for channel ``channel_number`` (``Basic.Publish`` is cached)."""
        topology = self._topology
        exchange = topology.exchange_for(envelope.route)
        mandatory = topology.mandatory(envelope.route)
        key = (channel_number, exchange, envelope.key, mandatory)
        publish = self._publish_frames.get(key)
        if publish is None:
            if len(envelope.key.encode()) > _MAX_ROUTING_KEY:
                raise ValueError(f"routing key too long (max {_MAX_ROUTING_KEY} bytes)")
            publish = pamqp.frame.marshal(
                Basic.Publish(exchange=exchange, routing_key=envelope.key, mandatory=mandatory),
                channel_number,
            )
            if len(self._publish_frames) >= _PUBLISH_FRAME_CACHE:
                self._publish_frames.clear()
            self._publish_frames[key] = publish
        header = content_header_frame(envelope, channel_number)
        return _Outgoing(envelope.message_id, [publish, header], envelope.body)

    async def _write(
        self, channel: aiormq.Channel, messages: list[_Outgoing]
    ) -> list[asyncio.Future[Any]]:
        """Write ``messages`` with those of concurrent publishers; their confirmation futures.

        Whoever holds the write lock writes every batch queued so far, so a publisher that
        waited for the lock usually finds its batch written already.
        """
        write = _Write(channel, messages, asyncio.get_running_loop().create_future())
        self._writes.append(write)
        try:
            async with self._write_lock:
                if not write.confirmations.done():
                    await self._write_queued(write)
        finally:
            if not write.confirmations.done():
                # Gave up (timeout, cancelled) before its batch was taken: drop it.
                write.abandoned = True
                if write in self._writes:
                    self._writes.remove(write)
        return write.confirmations.result()

    async def _write_queued(self, own: _Write) -> None:
        """Write every queued batch; ``own`` (the caller's) hears of a failure by the raise."""
        writes, self._writes = self._writes, []
        try:
            for channel in {id(w.channel): w.channel for w in writes}.values():
                group = [w for w in writes if w.channel is channel]
                confirmations = await _write_batch(channel, [m for w in group for m in w.messages])
                start = 0
                for write in group:
                    end = start + len(write.messages)
                    if not write.abandoned:
                        write.confirmations.set_result(confirmations[start:end])
                    start = end
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, Exception)
                else ConnectionError("the write of this batch was interrupted")
            )
            for write in writes:
                if write is not own and not write.confirmations.done() and not write.abandoned:
                    write.confirmations.set_exception(failure)
            raise


async def _write_batch(
    channel: aiormq.Channel, messages: Sequence[_Outgoing]
) -> list[asyncio.Future[Any]]:
    """Put ``messages`` on the wire in one write; one confirmation future per message.

    The bookkeeping is that of ``aiormq.Channel.basic_publish`` for each message: the next
    delivery tag, a future in ``confirmations`` (settled by aiormq's reader on ack, nack,
    return or channel close), and ``message_id_delivery_tag`` so a return finds its future.
    """
    if not messages:
        return []
    number = channel.number
    parts: list[bytes] = []
    for message in messages:
        parts += message.frames
        parts += _body_frames(message.body, channel.max_content_size, number)
    drain: asyncio.Future[None] = channel.create_future()
    frame = ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=drain)
    confirmations: list[asyncio.Future[Any]] = []
    async with channel.lock:
        first_tag = channel.delivery_tag
        sent = False
        try:
            for message in messages:
                channel.delivery_tag += 1
                confirmation = channel.create_future()
                channel.confirmations[channel.delivery_tag] = confirmation
                channel.message_id_delivery_tag[message.message_id] = channel.delivery_tag
                confirmations.append(confirmation)
            await channel.write_queue.put(frame)
            sent = True
            for tag, (message, confirmation) in enumerate(
                zip(messages, confirmations, strict=True), start=first_tag + 1
            ):
                confirmation.add_done_callback(
                    partial(_forget_message_id, channel, message.message_id, tag)
                )
            await drain
        except BaseException:
            if not sent:
                # The broker has not seen the batch: reuse its delivery tags under the lock.
                channel.delivery_tag = first_tag
                for tag, (message, confirmation) in enumerate(
                    zip(messages, confirmations, strict=False), start=first_tag + 1
                ):
                    channel.confirmations.pop(tag, None)
                    _forget_message_id(channel, message.message_id, tag)
                    confirmation.cancel()
            drain.cancel()
            raise
    return confirmations


def _body_frames(body: bytes, max_size: int, channel_number: int) -> list[bytes]:
    """The body frames of a message (none for an empty body), as aiormq splits them."""
    if len(body) < max_size:
        return [pamqp.frame.marshal(ContentBody(body), channel_number)] if body else []
    return [
        pamqp.frame.marshal(ContentBody(body[start : start + max_size]), channel_number)
        for start in range(0, len(body), max_size)
    ]


def _forget_message_id(
    channel: aiormq.Channel, message_id: str, tag: int, _: object = None
) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


# ---------------------------------------------------------------------- consuming


def _tag(message: Delivery) -> int:
    tag = message.delivery_tag
    if tag is None:  # pragma: no cover - a Basic.Deliver always carries one
        raise ValueError("a delivery without a delivery tag")
    return tag


def ack_one(message: Delivery) -> Awaitable[None]:
    """Ack ``message`` on its own (on the channel it came on)."""
    return message.channel.basic_ack(_tag(message))


def nack(message: Delivery) -> Awaitable[None]:
    """Hand ``message`` back to its queue (on the channel it came on)."""
    return message.channel.basic_nack(_tag(message), requeue=True)


class AckWriter:
    """Writes the acks of one subscription together: one frame write for the acks of a burst.

    The first handler to ack yields once, so the handlers finishing in the same loop iteration
    add their delivery tags, then writes them all (and any that arrive while it waits for room
    in the connection's write queue). The others return at once: their ack is on its way, and
    an ack lost with its channel only means a redelivery, which the receiver deduplicates.
    Use it only on an aiormq that :func:`supports_ack_writer`.
    """

    def __init__(self, queue_name: str) -> None:
        self._queue_name = queue_name
        self._pending: dict[aiormq.Channel, list[int]] = {}
        self._writing = False

    async def ack(self, message: Delivery) -> bool:
        """Ack ``message`` on the channel it came on; false if that channel closed (lost)."""
        # The channel the message came on: acks go there or nowhere.
        channel = message.channel
        if channel.is_closed:
            _ack_log.warning(
                "ack of %s on %s lost (its channel closed); the broker will redeliver it",
                message.header.properties.message_id,
                self._queue_name,
            )
            return False
        # An aiormq.Channel: the bus checked on connect (check()) that channels are.
        await self._ack(cast("aiormq.Channel", channel), _tag(message))
        return True

    async def _ack(self, channel: aiormq.Channel, delivery_tag: int) -> None:
        tags = self._pending.get(channel)
        if tags is None:
            self._pending[channel] = [delivery_tag]
        else:
            tags.append(delivery_tag)
        if self._writing:
            return
        self._writing = True
        try:
            await asyncio.sleep(0)
            await self.flush()
        finally:
            self._writing = False

    async def flush(self) -> None:
        """Write every pending ack (an ack on a closed channel is dropped, with a warning)."""
        while self._pending:
            pending, self._pending = self._pending, {}
            for channel, tags in pending.items():
                try:
                    await _write_acks(channel, tags)
                except BROKER_ERRORS as exc:
                    _ack_log.warning(
                        "ack of %d message(s) on %s lost (%s); the broker will redeliver them",
                        len(tags),
                        self._queue_name,
                        exc,
                    )


async def _write_acks(channel: aiormq.Channel, tags: list[int]) -> None:
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    frame = ChannelFrame.marshall(
        channel_number=channel.number, frames=[Basic.Ack(delivery_tag=tag) for tag in tags]
    )
    queue = channel.write_queue
    if queue.full():
        async with asyncio.timeout(_SETTLE_TIMEOUT):
            await queue.put(frame)
    else:
        queue.put_nowait(frame)


class Consumer:
    """A consumer of one queue (manual acks) on the aiormq channel under a robust channel.

    aiormq's consumer task calls ``on_message`` with each delivery. The consumer tag is the
    broker's at the first :meth:`consume` and kept after: consuming again (on the channel the
    robust channel reopened, or after the broker cancelled the consumer) uses it again.
    ``on_cancelled`` is called when the broker cancels this consumer (its queue was deleted,
    say); consuming again is the caller's to decide.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue_name: str,
        on_message: Callable[[Delivery], Coroutine[Any, Any, None]],
        on_cancelled: Callable[[], None],
    ) -> None:
        self._channel = channel
        self._queue_name = queue_name
        self._on_message = on_message
        self._on_cancelled = on_cancelled
        self._tag: str | None = None

    @property
    def tag(self) -> str | None:
        """The consumer tag (``None`` before the first :meth:`consume`)."""
        return self._tag

    async def _underlay(self) -> aiormq.Channel:
        # An aiormq.Channel: the bus checked on connect (check()) that it is one.
        underlay = await self._channel.get_underlay_channel()
        if not isinstance(underlay, aiormq.Channel):  # pragma: no cover - check() vetted it
            raise TransportError(f"not an aiormq channel: {underlay!r}")
        return underlay

    async def consume(self) -> None:
        """Consume on the robust channel's current aiormq channel, unless consuming there already.

        Raises:
            Whatever the broker or the connection raise (``BROKER_ERRORS``).
        """
        underlay = await self._underlay()
        if self._tag in underlay.consumers:
            return  # consuming already (a reopen and a recovery can race)
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        consume_ok = await underlay.basic_consume(
            self._queue_name, self._on_message, no_ack=False, consumer_tag=self._tag
        )
        self._tag = consume_ok.consumer_tag

    def _on_cancel(self, frame: Basic.Cancel) -> None:
        if self._tag is not None and frame.consumer_tag == self._tag:
            self._on_cancelled()

    async def is_consuming(self) -> bool:
        """Whether the broker currently knows this consumer (false while reconnecting)."""
        if self._tag is None or self._channel.is_closed:
            return False
        try:
            async with asyncio.timeout(0.5):
                underlay = await self._underlay()
        except BROKER_ERRORS:
            return False
        return self._tag in underlay.consumers

    async def cancel(self) -> None:
        """Cancel the consumer on the broker (nothing if it never consumed).

        Raises:
            Whatever the broker or the connection raise (``BROKER_ERRORS``).
        """
        if self._tag is not None:
            underlay = await self._underlay()
            await underlay.basic_cancel(self._tag)
