"""The wire codec: logical messages <-> transport-neutral envelopes (docs/protocol.md).

Bodies are UTF-8 JSON. Commands carry their payload as the whole body, so a participant written
in any language reads a plain JSON object; saga coordinates travel in headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import ValidationError

from sagas_abstractions import (
    CommandMessage,
    DeadLetterMessage,
    Envelope,
    ErrorInfo,
    EventKind,
    MessageDecodeError,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaEvent,
    StepKind,
)
from sagas_core._models import trusted

if TYPE_CHECKING:
    from datetime import datetime

__all__ = [
    "DEAD_LETTER_KEY",
    "EVENT_TYPE",
    "HEADER_ATTEMPT",
    "HEADER_ERROR_CODE",
    "HEADER_ERROR_MESSAGE",
    "HEADER_IDEMPOTENCY_KEY",
    "HEADER_IN_REPLY_TO",
    "HEADER_KIND",
    "HEADER_REASON",
    "HEADER_REPLY_TOKEN",
    "HEADER_SAGA_TYPE",
    "HEADER_STEP",
    "REPLY_TYPE",
    "dead_lettered",
    "decode_command",
    "decode_event",
    "decode_reply",
    "encode_answer",
    "encode_command",
    "encode_dead_letter",
    "encode_event",
    "encode_reply",
]

HEADER_SAGA_TYPE = "x-saga-type"
HEADER_STEP = "x-saga-step"
HEADER_ATTEMPT = "x-saga-attempt"
HEADER_KIND = "x-saga-kind"
HEADER_IDEMPOTENCY_KEY = "x-idempotency-key"
HEADER_IN_REPLY_TO = "x-in-reply-to"
HEADER_REPLY_TOKEN = "x-saga-reply-token"  # noqa: S105 - a header name, not a secret
HEADER_REASON = "x-dead-letter-reason"
HEADER_ERROR_CODE = "x-error-code"
HEADER_ERROR_MESSAGE = "x-error-message"
REPLY_TYPE = "saga.reply"
EVENT_TYPE = "saga.event"
DEAD_LETTER_KEY = "compensation-failed"

# Attempts are stored as 32-bit integers: a larger one could never be a current attempt.
_MAX_ATTEMPT = 2**31 - 1

_COMMAND_HEADERS = frozenset(
    {
        HEADER_SAGA_TYPE,
        HEADER_STEP,
        HEADER_ATTEMPT,
        HEADER_KIND,
        HEADER_IDEMPOTENCY_KEY,
        HEADER_REPLY_TOKEN,
    }
)

# Enum members by value and values by member, without the enum machinery's Python calls
# (``StepKind(text)`` costs a microsecond, ``kind.value`` a property call): every message.
_KINDS = {kind.value: kind for kind in StepKind}
_KIND_TEXT = {kind: kind.value for kind in StepKind}
_EVENT_KIND_TEXT = {kind: kind.value for kind in EventKind}
_REPLY_STATUSES = {status.value: status for status in ReplyStatus}
# Members as module constants for the per-message encoders: on Python 3.11 looking a member up
# on its class (``RouteKind.COMMAND``) takes EnumType.__getattr__'s slow path (figures:
# docs/performance.md, "Figures behind the code").
_COMMAND_ROUTE = RouteKind.COMMAND
_REPLY_ROUTE = RouteKind.REPLY
_EVENT_ROUTE = RouteKind.EVENT
_FAILED_REPLY = ReplyStatus.FAILED
_STATUS_TEXT = {status: status.value for status in ReplyStatus}


def _loads(envelope: Envelope) -> Any:
    try:
        return pydantic_core.from_json(envelope.body)
    except ValueError as exc:
        raise MessageDecodeError(
            f"message {envelope.message_id!r} body is not valid JSON: {exc}",
            saga_id=envelope.correlation_id,
        ) from exc


def _envelope(values: dict[str, Any]) -> Envelope:
    """An envelope of ``values`` (every field, in field order) taken from a validated message."""
    if not values["key"] or not values["message_id"]:
        return Envelope(**values)  # the only constraints a message does not imply: raise
    return trusted(Envelope, values)


def _header(envelope: Envelope, name: str) -> str:
    value = envelope.headers.get(name)
    if value is None or value == "":
        raise MessageDecodeError(
            f"message {envelope.message_id!r} lacks the {name} header (see docs/protocol.md)",
            saga_id=envelope.correlation_id,
        )
    return value


def _coordinates(envelope: Envelope) -> tuple[str, str, str, int, StepKind]:
    saga_id = envelope.correlation_id
    if not saga_id:
        raise MessageDecodeError(
            f"message {envelope.message_id!r} lacks correlation_id (the saga id)"
        )
    headers = envelope.headers
    saga_type = headers.get(HEADER_SAGA_TYPE)
    step = headers.get(HEADER_STEP)
    raw_attempt = headers.get(HEADER_ATTEMPT)
    raw_kind = headers.get(HEADER_KIND)
    if not (saga_type and step and raw_attempt and raw_kind):
        # One is missing or empty: name the first, in this order.
        saga_type = _header(envelope, HEADER_SAGA_TYPE)
        step = _header(envelope, HEADER_STEP)
        raw_attempt = _header(envelope, HEADER_ATTEMPT)
        raw_kind = _header(envelope, HEADER_KIND)
    try:
        attempt: int | None = int(raw_attempt)
    except ValueError:
        attempt = None
    kind = _KINDS.get(raw_kind)
    if attempt is None or kind is None:
        raise MessageDecodeError(
            f"message {envelope.message_id!r} has a bad {HEADER_ATTEMPT}={raw_attempt!r} or "
            f"{HEADER_KIND}={raw_kind!r}",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    if attempt < 1 or attempt > _MAX_ATTEMPT:
        bound = ">= 1" if attempt < 1 else f"<= {_MAX_ATTEMPT}"
        raise MessageDecodeError(
            f"message {envelope.message_id!r} has {HEADER_ATTEMPT}={attempt}; it must be {bound}",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    return saga_id, saga_type, step, attempt, kind


def _saga_headers(saga_type: str, step: str, attempt: int, kind: StepKind) -> dict[str, str]:
    return {
        HEADER_SAGA_TYPE: saga_type,
        HEADER_STEP: step,
        HEADER_ATTEMPT: str(attempt),
        HEADER_KIND: _KIND_TEXT[kind],
    }


def encode_command(command: CommandMessage, *, reply_to: str | None = None) -> Envelope:
    """Encode a command for its destination.

    Args:
        command: The command.
        reply_to: Where the reply goes, when not ``command.reply_to`` (one must be set).
    """
    saga_headers = _saga_headers(command.saga_type, command.step, command.attempt, command.kind)
    saga_headers[HEADER_IDEMPOTENCY_KEY] = command.idempotency_key
    if command.reply_token is not None:
        saga_headers[HEADER_REPLY_TOKEN] = command.reply_token
    if command.headers:
        headers = dict(command.headers)
        headers.update(saga_headers)
    else:
        headers = saga_headers
    return _envelope(
        {
            "route": _COMMAND_ROUTE,
            "key": command.destination,
            "message_id": command.message_id,
            "message_type": command.command_type,
            "correlation_id": command.saga_id,
            "reply_to": reply_to or command.reply_to,
            "headers": headers,
            "body": pydantic_core.to_json(command.payload),
            "timestamp": command.created_at,
            "user_id": None,
        }
    )


def decode_command(envelope: Envelope) -> CommandMessage:
    """Decode a command envelope.

    Raises:
        MessageDecodeError: naming the missing or malformed property.
    """
    saga_id, saga_type, step, attempt, kind = _coordinates(envelope)
    payload = _loads(envelope)
    if not isinstance(payload, dict):
        raise MessageDecodeError(
            f"command {envelope.message_id!r} body must be a JSON object",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    headers = envelope.headers
    # Every value is checked above or comes from the (validated) envelope.
    return trusted(
        CommandMessage,
        {
            "message_id": envelope.message_id,
            "saga_id": saga_id,
            "saga_type": saga_type,
            "step": step,
            "attempt": attempt,
            "kind": kind,
            "command_type": envelope.message_type,
            "destination": envelope.key,
            "payload": payload,
            "idempotency_key": headers.get(HEADER_IDEMPOTENCY_KEY) or envelope.message_id,
            "reply_to": envelope.reply_to,
            "created_at": envelope.timestamp,
            "headers": (
                {}
                if _COMMAND_HEADERS.issuperset(headers)
                else {k: v for k, v in headers.items() if k not in _COMMAND_HEADERS}
            ),
            "reply_token": headers.get(HEADER_REPLY_TOKEN) or None,
        },
    )


def encode_reply(reply: ReplyMessage, reply_to: str) -> Envelope:
    """Encode a reply for the orchestrator's reply queue ``reply_to``."""
    headers = _saga_headers(reply.saga_type, reply.step, reply.attempt, reply.kind)
    if reply.in_reply_to:
        headers[HEADER_IN_REPLY_TO] = reply.in_reply_to
    if reply.reply_token is not None:
        headers[HEADER_REPLY_TOKEN] = reply.reply_token
    return _reply_envelope(
        message_id=reply.message_id,
        saga_id=reply.saga_id,
        at=reply.created_at,
        body=_reply_body(reply.status, reply.data, reply.error),
        reply_to=reply_to,
        headers=headers,
    )


def encode_answer(
    command: CommandMessage,
    *,
    status: ReplyStatus,
    data: dict[str, Any],
    error: ErrorInfo | None,
    at: datetime,
) -> Envelope:
    """Encode the reply to ``command`` for its ``reply_to`` (which must be set).

    The same envelope as ``encode_reply(ReplyMessage.answering(command, ...), reply_to)``,
    without making the reply message first (a participant answers every command). It echoes
    the command's reply token, so a participant's own code never sees it.
    """
    if not command.reply_to:
        raise ValueError(f"command {command.message_id!r} has no reply_to to answer to")
    headers = _saga_headers(command.saga_type, command.step, command.attempt, command.kind)
    headers[HEADER_IN_REPLY_TO] = command.message_id
    if command.reply_token is not None:
        headers[HEADER_REPLY_TOKEN] = command.reply_token
    return _reply_envelope(
        message_id=ReplyMessage.id_answering(command.message_id),
        saga_id=command.saga_id,
        at=at,
        body=_reply_body(status, data, error),
        reply_to=command.reply_to,
        headers=headers,
    )


def _reply_body(status: ReplyStatus, data: dict[str, Any], error: ErrorInfo | None) -> bytes:
    body: dict[str, Any] = {"status": _STATUS_TEXT[status], "data": data}
    if error is not None:
        body["error"] = error.model_dump(mode="json")
    return pydantic_core.to_json(body)


def _reply_envelope(
    *,
    message_id: str,
    saga_id: str,
    at: datetime,
    body: bytes,
    reply_to: str,
    headers: dict[str, str],
) -> Envelope:
    return _envelope(
        {
            "route": _REPLY_ROUTE,
            "key": reply_to,
            "message_id": message_id,
            "message_type": REPLY_TYPE,
            "correlation_id": saga_id,
            "reply_to": None,
            "headers": headers,
            "body": body,
            "timestamp": at,
            "user_id": None,
        }
    )


def decode_reply(envelope: Envelope) -> ReplyMessage:
    """Decode a reply envelope.

    Raises:
        MessageDecodeError: naming the missing or malformed property.
    """
    saga_id, saga_type, step, attempt, kind = _coordinates(envelope)
    body = _loads(envelope)
    if not isinstance(body, dict):
        raise MessageDecodeError(
            f"reply {envelope.message_id!r} body must be a JSON object",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    status = _REPLY_STATUSES.get(str(body.get("status")))
    if status is None:
        looks_like = (
            f" (a {envelope.message_type!r} message: a command sent to the reply route?)"
            if "status" not in body and envelope.message_type != REPLY_TYPE
            else ""
        )
        raise MessageDecodeError(
            f"reply {envelope.message_id!r} status must be 'succeeded' or 'failed', got "
            f"{body.get('status')!r}{looks_like}",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    data = body.get("data") or {}
    if not isinstance(data, dict):
        raise MessageDecodeError(
            f"reply {envelope.message_id!r} data must be a JSON object",
            saga_id=saga_id,
            saga_type=saga_type,
            step=step,
        )
    error = None
    if status is _FAILED_REPLY:
        where = {"saga_id": saga_id, "saga_type": saga_type, "step": step}
        raw_error = body.get("error") or {"code": "failed"}
        try:
            error = ErrorInfo.model_validate(raw_error)
        except ValidationError as exc:
            raise MessageDecodeError(
                f"reply {envelope.message_id!r} error must be {{code, message, retryable}}: "
                f"{exc.errors(include_url=False)[0]['msg']}",
                **where,
            ) from exc
    # Every value is checked above or comes from the (validated) envelope.
    return trusted(
        ReplyMessage,
        {
            "message_id": envelope.message_id,
            "saga_id": saga_id,
            "saga_type": saga_type,
            "step": step,
            "attempt": attempt,
            "kind": kind,
            "status": status,
            "data": data,
            "error": error,
            "in_reply_to": envelope.headers.get(HEADER_IN_REPLY_TO),
            "created_at": envelope.timestamp,
            "reply_token": envelope.headers.get(HEADER_REPLY_TOKEN) or None,
        },
    )


def encode_event(event: SagaEvent) -> Envelope:
    """Encode a saga event for the events topic (routing key ``<saga-type>.<kind>``)."""
    return _envelope(
        {
            "route": _EVENT_ROUTE,
            "key": f"{event.saga_type}.{_EVENT_KIND_TEXT[event.kind]}",  # event.routing_key
            "message_id": event.event_id,
            "message_type": EVENT_TYPE,
            "correlation_id": event.saga_id,
            "reply_to": None,
            "headers": {HEADER_SAGA_TYPE: event.saga_type},
            # The model's own serializer writes the JSON in one pass (as model_dump + dumps).
            "body": event.__pydantic_serializer__.to_json(event),
            "timestamp": event.at,
            "user_id": None,
        }
    )


def decode_event(envelope: Envelope) -> SagaEvent:
    """Decode a saga event envelope."""
    try:
        return SagaEvent.model_validate(_loads(envelope))
    except ValidationError as exc:
        raise MessageDecodeError(
            f"event {envelope.message_id!r} does not fit SagaEvent: {exc}",
            saga_id=envelope.correlation_id,
        ) from exc


def encode_dead_letter(dead: DeadLetterMessage) -> Envelope:
    """Encode a parked compensation: the command as it was, with its last error in headers."""
    command = encode_command(dead.command)
    headers = dict(command.headers)
    headers.pop(HEADER_REPLY_TOKEN, None)  # a secret: the dead-letter queue has other readers
    headers[HEADER_REASON] = dead.reason
    headers[HEADER_ERROR_CODE] = dead.error.code
    headers[HEADER_ERROR_MESSAGE] = dead.error.message
    return command.model_copy(
        update={
            "route": RouteKind.DEAD_LETTER,
            "key": DEAD_LETTER_KEY,
            "message_id": dead.message_id,
            "headers": headers,
            "timestamp": dead.at,
        }
    )


def dead_lettered(envelope: Envelope, reason: str) -> Envelope:
    """The same message, addressed to the dead-letter queue with ``reason`` in its headers.

    A reply token it carries is left out: the dead-letter queue has other readers.
    """
    headers = dict(envelope.headers)
    headers.pop(HEADER_REPLY_TOKEN, None)
    headers[HEADER_REASON] = reason
    return envelope.model_copy(
        update={"route": RouteKind.DEAD_LETTER, "key": DEAD_LETTER_KEY, "headers": headers}
    )
