"""Envelopes <-> AMQP messages (docs/protocol.md, "AMQP properties").

The mapping is one to one: ``message_id``, ``correlation_id``, ``type`` (the envelope's
``message_type``), ``reply_to``, ``timestamp`` (whole seconds), ``content_type``
``application/json``, persistent delivery, and the envelope headers as AMQP string headers.

The publishing hot path encodes the content header frame itself (:func:`content_header_frame`):
pamqp's generic marshalling looks up the AMQP type of every property and header by name, and
was the largest part of publishing left. The bytes are pamqp's, byte for byte (a test pins
it), and anything unusual (an over-long string, a header key pamqp would truncate) goes
through pamqp, which raises or logs as it always did.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
import pamqp.frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from sagas_abstractions import Envelope, MessageDecodeError, RouteKind
from sagas_rabbitmq.topology import DEAD_LETTER_REASON_HEADER

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

__all__ = [
    "CONTENT_TYPE",
    "amqp_properties",
    "content_header_frame",
    "from_amqp",
    "header_text",
    "to_amqp",
]

CONTENT_TYPE = "application/json"
_CONTENT_ENCODING = "utf-8"
_PERSISTENT = 2

# Content header frame: frame type 2, channel, payload size, then class 60 (basic), weight 0,
# body size and the property flags (AMQP 0-9-1, 4.2.6 and 4.2.6.1), then the properties.
_HEADER = struct.Struct(">BHIHHQH")
_HEADER_PAYLOAD = 14  # class, weight, body size, flags
_FRAME_END = b"\xce"
_SHORT = struct.Struct(">B")
_LONG = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")
_MAX_SHORT = 255
_MAX_KEY = 128
# The properties every message carries: content type and encoding, headers (even empty: pamqp
# sends an empty table), delivery mode, message id and timestamp.
_ALWAYS = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0080 | 0x0040
_CORRELATION_ID = 0x0400
_REPLY_TO = 0x0200
_MESSAGE_TYPE = 0x0020
_USER_ID = 0x0010
_FIXED_HEAD = (
    _SHORT.pack(len(CONTENT_TYPE))
    + CONTENT_TYPE.encode()
    + _SHORT.pack(len(_CONTENT_ENCODING))
    + _CONTENT_ENCODING.encode()
)


class _Unusual(Exception):  # noqa: N818 - a signal, not an error
    """A value the fast encoder leaves to pamqp."""


def to_amqp(
    envelope: Envelope, *, headers: dict[str, str] | None = None, user_id: str | None = None
) -> aio_pika.Message:
    """The AMQP message carrying ``envelope`` (``headers`` replace the envelope's).

    ``user_id`` is not taken from the envelope: a message republished by another connection
    (a redelivery copy, a dead letter) must not carry its first publisher's user.
    """
    return aio_pika.Message(
        envelope.body,
        message_id=envelope.message_id,
        correlation_id=envelope.correlation_id,
        type=envelope.message_type,
        reply_to=envelope.reply_to,
        timestamp=envelope.timestamp.astimezone(UTC),
        content_type=CONTENT_TYPE,
        content_encoding=_CONTENT_ENCODING,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=dict(envelope.headers if headers is None else headers),
        user_id=user_id,
    )


def amqp_properties(envelope: Envelope) -> Basic.Properties:
    """The AMQP properties of ``envelope``, the same as :func:`to_amqp` puts on the wire."""
    return Basic.Properties(
        content_type=CONTENT_TYPE,
        content_encoding=_CONTENT_ENCODING,
        # The envelope is frozen and pamqp only reads the table: no copy needed.
        headers=envelope.headers,  # type: ignore[arg-type]
        delivery_mode=_PERSISTENT,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp.astimezone(UTC),
        message_type=envelope.message_type,
        user_id=envelope.user_id,
    )


def content_header_frame(envelope: Envelope, channel_number: int) -> bytes:
    """The content header frame of ``envelope`` on ``channel_number``, ready for the wire.

    The same bytes as pamqp's ``ContentHeader(properties=amqp_properties(envelope))``.

    Raises:
        TypeError: A property pamqp cannot encode (a short string over 255 bytes, say).
    """
    body_size = len(envelope.body)
    try:
        flags, properties = _properties(envelope)
    except _Unusual:
        return pamqp.frame.marshal(
            ContentHeader(properties=amqp_properties(envelope), body_size=body_size),
            channel_number,
        )
    return (
        _HEADER.pack(2, channel_number, _HEADER_PAYLOAD + len(properties), 60, 0, body_size, flags)
        + properties
        + _FRAME_END
    )


def _short(value: str) -> bytes:
    data = value.encode()
    if len(data) > _MAX_SHORT:
        raise _Unusual
    return _SHORT.pack(len(data)) + data


def _table(headers: dict[str, str]) -> bytes:
    parts = []
    for key, value in sorted(headers.items()):
        name = key.encode()
        if len(name) > _MAX_KEY or type(value) is not str:
            raise _Unusual
        data = value.encode()
        parts.append(_SHORT.pack(len(name)) + name + b"S" + _LONG.pack(len(data)) + data)
    table = b"".join(parts)
    return _LONG.pack(len(table)) + table


def _properties(envelope: Envelope) -> tuple[int, bytes]:
    """The property flags and the encoded properties, in the order of their flags."""
    flags = _ALWAYS
    parts = [_FIXED_HEAD, _table(envelope.headers), b"\x02"]
    if envelope.correlation_id:
        flags |= _CORRELATION_ID
        parts.append(_short(envelope.correlation_id))
    if envelope.reply_to:
        flags |= _REPLY_TO
        parts.append(_short(envelope.reply_to))
    parts.append(_short(envelope.message_id))
    seconds = int(envelope.timestamp.astimezone(UTC).timestamp())
    if seconds < 0:
        raise _Unusual
    parts.append(_TIMESTAMP.pack(seconds))
    if envelope.message_type:
        flags |= _MESSAGE_TYPE
        parts.append(_short(envelope.message_type))
    if envelope.user_id:
        flags |= _USER_ID
        parts.append(_short(envelope.user_id))
    return flags, b"".join(parts)


def header_text(value: Any) -> str:
    """An AMQP header value as text: strings as they are, numbers in decimal, tables as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _death_reason(headers: dict[str, Any]) -> str | None:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    death = deaths[0]
    reason = header_text(death.get("reason", "unknown"))
    queue = header_text(death.get("queue", "?"))
    if reason == "delivery_limit":
        return f"delivery limit reached in queue {queue}: its handler kept failing"
    return f"{reason} in queue {queue}"


def from_amqp(message: DeliveredMessage, route: RouteKind, key: str) -> Envelope:
    """The envelope an AMQP delivery carries, addressed to ``route``/``key``.

    Raises:
        MessageDecodeError: The message lacks ``message_id`` (receivers could not dedupe it).
    """
    properties = message.header.properties
    if not properties.message_id:
        raise MessageDecodeError(
            f"a message on {route.value}/{key} has no message_id property (see docs/protocol.md)",
            saga_id=properties.correlation_id,
        )
    raw = properties.headers or {}
    headers = {name: header_text(value) for name, value in raw.items()}
    if route is RouteKind.DEAD_LETTER and DEAD_LETTER_REASON_HEADER not in headers:
        reason = _death_reason(raw)
        if reason is not None:
            headers[DEAD_LETTER_REASON_HEADER] = reason
    timestamp = properties.timestamp or datetime.now(UTC)
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return Envelope(
        route=route,
        key=key,
        message_id=properties.message_id,
        message_type=properties.message_type or "",
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        headers=headers,
        body=message.body,
        timestamp=timestamp,
        user_id=properties.user_id or None,
    )
