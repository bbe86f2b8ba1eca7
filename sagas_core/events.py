"""Bus events that start, advance and cancel sagas: routing, parsing and publishing helpers.

A saga definition declares the events it reacts to (``starts_on``, ``wait_for``, ``cancel_on``);
the runtime subscribes to their topics and hands each delivery to
:meth:`Orchestrator.handle_event <sagas_core.orchestrator.Orchestrator.handle_event>`. This
module holds the pieces that need no I/O: the topic index, turning a delivery into the event
model and the saga ids, and :func:`event_envelope` for services that publish events.
See ``docs/concepts/events.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from sagas_abstractions import Envelope, InvalidEvent, RouteKind
from sagas_core.definition import EventTrigger, describe_validation, event_name

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sagas_core.definition import SagaDefinition

__all__ = [
    "EVENT_NAME_HEADER",
    "EventOutcome",
    "EventRoutes",
    "event_envelope",
    "event_inbox_id",
    "parse_event",
]

EVENT_NAME_HEADER = "x-event-name"
"""Header naming the event on the wire (informational: routing is by topic)."""

_MAX_INBOX_ID = 400


@dataclass(slots=True)
class EventOutcome:
    """What one delivered event did.

    Attributes:
        started: Ids of sagas the event started.
        applied: Ids of existing sagas the event was applied to (completed a waiting step, or
            sent the saga into compensation).
        kept: Ids of sagas that keep the event for a wait step they have not reached yet.
        ignored: Ids of sagas the event found no use for (a duplicate delivery; a missing or
            finished saga under the ``ignore`` policy).
        dead_letter: Why the event must go to the dead-letter queue (empty: it need not).
    """

    started: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    dead_letter: list[str] = field(default_factory=list)


class EventRoutes:
    """Which (definition, trigger) pairs listen to each topic."""

    def __init__(self, definitions: Iterable[SagaDefinition]) -> None:
        self._routes: dict[str, list[tuple[SagaDefinition, EventTrigger]]] = {}
        for definition in definitions:
            for trigger in definition.triggers:
                self._routes.setdefault(trigger.topic, []).append((definition, trigger))

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic some saga listens to."""
        return tuple(self._routes)

    def get(self, topic: str) -> list[tuple[SagaDefinition, EventTrigger]]:
        """The listeners of ``topic`` (empty when none)."""
        return self._routes.get(topic, [])


def parse_event(
    envelope: Envelope, definition: SagaDefinition, trigger: EventTrigger
) -> tuple[BaseModel, list[str]]:
    """The event model and the saga ids of a delivery.

    Raises:
        InvalidEvent: The body does not fit the event model, or the ids cannot be derived;
            names the saga type, the event and each failing field.
    """
    try:
        event = trigger.model.model_validate_json(envelope.body)
    except ValidationError as exc:
        raise InvalidEvent(
            f"event {trigger.name} (message {envelope.message_id}) does not fit "
            f"{trigger.model.__name__}: {describe_validation(exc)}",
            saga_type=definition.name,
            step=trigger.step,
        ) from exc
    try:
        ids = trigger.ids(event)
    except Exception as exc:
        raise InvalidEvent(
            f"the saga id of event {trigger.name} (message {envelope.message_id}) could not be "
            f"derived: {type(exc).__name__}: {exc}",
            saga_type=definition.name,
            step=trigger.step,
        ) from exc
    too_long = [saga_id for saga_id in ids if len(saga_id) > 200]  # noqa: PLR2004 - id column
    if too_long:
        raise InvalidEvent(
            f"event {trigger.name} (message {envelope.message_id}) names a saga id longer "
            f"than 200 characters: {too_long[0][:40]}...",
            saga_type=definition.name,
            step=trigger.step,
        )
    return event, ids


def event_inbox_id(message_id: str, saga_id: str) -> str:
    """The inbox key of one event applied to one saga (an event can correlate to several)."""
    key = f"{message_id}@{saga_id}"
    if len(key) <= _MAX_INBOX_ID:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def event_envelope(
    event: BaseModel,
    *,
    message_id: str,
    topic: str | None = None,
    name: str | None = None,
    correlation_id: str | None = None,
    at: datetime | None = None,
    headers: dict[str, str] | None = None,
) -> Envelope:
    """The envelope of a domain event, ready for ``MessageBus.publish``.

    What a service that publishes events to sagas sends: JSON of the event model, routed by
    ``topic`` (the event's class name by default) on the events route.

    Args:
        event: The event.
        message_id: A stable, unique id: a redelivered or republished event must carry the
            same one (sagas deduplicate on it).
        topic: The routing key sagas subscribed with (``starts_on(..., topic=)``).
        name: The event's name (its class name by default).
        correlation_id: Optional business correlation id.
        at: When the event happened (now by default).
        headers: Extra headers (trace context).
    """
    event_type = name or event_name(type(event))
    return Envelope(
        route=RouteKind.EVENT,
        key=topic or event_type,
        message_id=message_id,
        message_type=event_type,
        correlation_id=correlation_id,
        headers={EVENT_NAME_HEADER: event_type, **(headers or {})},
        body=json.dumps(event.model_dump(mode="json"), separators=(",", ":")).encode(),
        timestamp=at or datetime.now(UTC),
    )
