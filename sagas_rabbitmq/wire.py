"""Envelopes <-> AMQP messages (docs/protocol.md, "AMQP properties").

The mapping is one to one: ``message_id``, ``correlation_id``, ``type`` (the envelope's
``message_type``), ``reply_to``, ``timestamp`` (whole seconds), ``content_type``
``application/json``, persistent delivery, and the envelope headers as AMQP string headers.

The publishing hot path builds pamqp's ``Basic.Properties`` directly (:func:`amqp_properties`):
an ``aio_pika.Message`` costs a locked ``__setattr__`` per field and then builds the same
properties object again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
from pamqp.commands import Basic

from sagas_abstractions import Envelope, MessageDecodeError, RouteKind
from sagas_rabbitmq.topology import DEAD_LETTER_REASON_HEADER

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

__all__ = ["CONTENT_TYPE", "amqp_properties", "from_amqp", "header_text", "to_amqp"]

CONTENT_TYPE = "application/json"
_CONTENT_ENCODING = "utf-8"
_PERSISTENT = 2


def to_amqp(envelope: Envelope, *, headers: dict[str, str] | None = None) -> aio_pika.Message:
    """The AMQP message carrying ``envelope`` (``headers`` replace the envelope's)."""
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
    )


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
    )
