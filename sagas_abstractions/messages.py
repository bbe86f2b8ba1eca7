"""Messages: the logical commands, replies and events, and the transport-neutral envelope.

The logical models are what the engine and participants work with; :class:`Envelope` is what a
:class:`~sagas_abstractions.ports.MessageBus` carries (JSON bytes plus protocol headers, see
``docs/protocol.md``). ``sagas_core.codec`` converts between the two.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sagas_abstractions.enums import EventKind, ReplyStatus, RouteKind, SagaStatus, StepKind
from sagas_abstractions.models import ErrorInfo

__all__ = [
    "CommandMessage",
    "DeadLetterMessage",
    "Envelope",
    "OutboxRecord",
    "ReplyMessage",
    "SagaEvent",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class CommandMessage(BaseModel):
    """A command asking a participant to execute or compensate one step.

    Attributes:
        message_id: Deterministic id ``<saga_id>:<step>:<kind>:<attempt>``; receivers dedupe on it.
        saga_id: The saga (also the AMQP ``correlation_id``).
        saga_type: The saga definition's name.
        step: The step's name.
        attempt: Attempt number; a reply must echo it.
        kind: Execute or compensate.
        command_type: The command's name (the pydantic model's class name by default).
        destination: The participant destination the command is routed to.
        payload: The command body.
        idempotency_key: Stable across retries of the same step and kind; participants use it to
            make their side effects idempotent.
        reply_to: Where the reply goes (the orchestrator group's reply queue).
        created_at: When the command was decided.
        headers: Extra headers to carry (trace context).
        reply_token: The secret the reply must echo to be applied (``x-saga-reply-token``):
            unguessable, one per attempt, readable only by the destination. ``None`` for a
            command that asks for none (sent before reply tokens existed). Never shown in a
            ``repr``; never log it.
    """

    model_config = _FROZEN

    message_id: str
    saga_id: str
    saga_type: str
    step: str
    attempt: int = Field(ge=1)
    kind: StepKind
    command_type: str
    destination: str
    payload: dict[str, Any]
    idempotency_key: str
    reply_to: str | None = None
    created_at: datetime
    headers: dict[str, str] = Field(default_factory=dict)
    reply_token: str | None = Field(default=None, repr=False)


class ReplyMessage(BaseModel):
    """A participant's answer to one command.

    Attributes:
        message_id: The reply's own id (``<command message id>:reply`` by convention).
        saga_id: Echoed from the command's ``correlation_id``.
        saga_type: Echoed from the command.
        step: Echoed from the command.
        attempt: Echoed from the command: the fencing token.
        kind: Echoed from the command.
        status: Succeeded or failed.
        data: On success, data to merge into the saga data.
        error: On failure, why.
        in_reply_to: The command's message id.
        created_at: When the reply was made.
        reply_token: Echoed from the command: proves the reply comes from a reader of the
            command. Never shown in a ``repr``; never log it.
    """

    model_config = _FROZEN

    message_id: str
    saga_id: str
    saga_type: str
    step: str
    attempt: int = Field(ge=1)
    kind: StepKind
    status: ReplyStatus
    data: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    in_reply_to: str | None = None
    created_at: datetime
    reply_token: str | None = Field(default=None, repr=False)

    @staticmethod
    def id_answering(command_message_id: str) -> str:
        """The id of the reply to the command with this id: ``<command id>:reply``.

        Deterministic, so a redelivered command's reply has the id of the first one and the
        orchestrator's inbox recognises it.
        """
        return f"{command_message_id}:reply"

    @classmethod
    def answering(
        cls,
        command: CommandMessage,
        *,
        status: ReplyStatus,
        at: datetime,
        data: dict[str, Any] | None = None,
        error: ErrorInfo | None = None,
    ) -> ReplyMessage:
        """The reply to ``command``: echoes its coordinates and token, id ``<command id>:reply``."""
        return cls(
            message_id=cls.id_answering(command.message_id),
            saga_id=command.saga_id,
            saga_type=command.saga_type,
            step=command.step,
            attempt=command.attempt,
            kind=command.kind,
            status=status,
            data=data or {},
            error=error,
            in_reply_to=command.message_id,
            created_at=at,
            reply_token=command.reply_token,
        )


class SagaEvent(BaseModel):
    """A status change of a saga, published to the saga-events topic.

    Attributes:
        event_id: Deterministic id ``<saga_id>:<version>:<n>``.
        saga_id: The saga.
        saga_type: The saga definition's name.
        kind: What happened.
        status: The saga's status when it happened; the events of one transition come in
            order, so a ``step_failed`` that starts compensation says ``running`` and the
            ``compensating`` event after it says ``compensating``.
        step: The step concerned, when any.
        attempt: The attempt concerned, when any.
        version: The saga's version after it happened.
        at: When it happened.
        error: The error concerned, when any.
        detail: Free text (an operator's note, for example).
    """

    model_config = _FROZEN

    event_id: str
    saga_id: str
    saga_type: str
    kind: EventKind
    status: SagaStatus
    step: str | None = None
    attempt: int | None = None
    version: int
    at: datetime
    error: ErrorInfo | None = None
    detail: str | None = None

    @property
    def routing_key(self) -> str:
        """Topic routing key ``<saga-type>.<kind>``."""
        return f"{self.saga_type}.{self.kind.value}"


class DeadLetterMessage(BaseModel):
    """A compensation that ran out of attempts, parked for a human with its last error.

    Attributes:
        message_id: Deterministic id ``<command message id>:dead``.
        command: The compensation command that could not be completed.
        error: Its last error.
        reason: Why it was dead-lettered, in words.
        at: When.
    """

    model_config = _FROZEN

    message_id: str
    command: CommandMessage
    error: ErrorInfo
    reason: str
    at: datetime


class Envelope(BaseModel):
    """A message as a bus carries it: a route, protocol properties, headers and a JSON body.

    Attributes:
        route: The kind of address.
        key: The address within that kind: a destination, a reply queue, an event routing key.
        message_id: Deterministic id; receivers deduplicate on it.
        message_type: The logical type (command name, ``saga.reply``, ``saga.event``...).
        correlation_id: The saga id.
        reply_to: Where replies go, for commands.
        headers: Protocol headers (``x-saga-*``, ``x-idempotency-key``, trace context).
        body: UTF-8 JSON.
        timestamp: When the message was made.
        user_id: Who published it, as the broker validated it (the AMQP ``user_id``
            property), when the transport has one; only ever read from a delivery, never
            published.
    """

    model_config = _FROZEN

    route: RouteKind
    key: str = Field(min_length=1)
    message_id: str = Field(min_length=1)
    message_type: str
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: bytes
    timestamp: datetime
    user_id: str | None = None


class OutboxRecord(BaseModel):
    """An envelope waiting in the outbox to be published.

    Attributes:
        id: Store-assigned id, increasing in insertion order.
        saga_id: The saga that produced the message (publishing is ordered per saga).
        envelope: The message to publish.
        created_at: When it was written.
        attempts: How many publish attempts failed so far.
    """

    model_config = _FROZEN

    id: int
    saga_id: str
    envelope: Envelope
    created_at: datetime
    attempts: int = 0
