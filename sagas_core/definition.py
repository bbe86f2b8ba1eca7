"""Immutable saga definitions, as ``SagaBuilder.build()`` returns them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from sagas_abstractions import InvalidSagaData, StepKind

if TYPE_CHECKING:
    from datetime import timedelta

    from sagas_core.retry import RetryPolicy

__all__ = [
    "ActionKind",
    "ActionSpec",
    "EventRole",
    "EventTrigger",
    "LocalHandler",
    "MissingSagaPolicy",
    "PayloadBuilder",
    "ReplyMerger",
    "SagaDefinition",
    "StepDefinition",
    "TimeoutOf",
    "event_name",
]

PayloadBuilder = Callable[[BaseModel], dict[str, Any]]
"""Builds a command payload (JSON-compatible) from the saga data model."""

ReplyMerger = Callable[[BaseModel, Mapping[str, Any]], dict[str, Any]]
"""Merges a successful reply's data into the saga data; returns the new data as a dict."""

LocalHandler = Callable[..., Awaitable[Any]]
"""An async callable run inside the worker for a local step or compensation."""

TimeoutOf = Callable[[BaseModel], "timedelta | None"]
"""A per-saga timeout: computed from the saga data each time an attempt begins.

Returns a positive span, or ``None`` for no timeout; raises when it cannot be computed.
"""


class ActionKind(StrEnum):
    """Where an action runs."""

    REMOTE = "remote"
    """A command sent to a participant over the bus."""
    LOCAL = "local"
    """An async callable run by the worker itself (routed through the bus all the same, so it is
    as durable as a remote step)."""
    WAIT = "wait"
    """Nothing is sent: the step waits for a bus event (``wait_for``) to complete it."""


@dataclass(frozen=True, slots=True, eq=False)
class ActionSpec:
    """One thing a step does: execute it, or compensate it.

    Attributes:
        kind: Remote or local.
        command_type: Name on the wire (the command model's class name for remote actions).
        destination: Where the command goes.
        build_payload: Builds the command payload from the saga data.
        timeout: How long to wait for a reply, per attempt (``None``: forever).
        retry: When to try again.
        command_model: The command's pydantic model (remote actions).
        handler: The callable to run (local actions).
        timeout_of: Computes the timeout from the saga data instead (``timeout`` is then
            ``None``); see :meth:`timeout_for`.
    """

    kind: ActionKind
    command_type: str
    destination: str
    build_payload: PayloadBuilder
    timeout: timedelta | None
    retry: RetryPolicy
    command_model: type[BaseModel] | None = None
    handler: LocalHandler | None = None
    timeout_of: TimeoutOf | None = None

    def timeout_for(self, data: Callable[[], BaseModel]) -> timedelta | None:
        """This attempt's timeout; ``data`` (the saga data) is asked for only when it is needed.

        Raises:
            Exception: Whatever the per-saga timeout function raises, or ``ValueError`` when it
                returns something other than a positive span or ``None``.
        """
        if self.timeout_of is None:
            return self.timeout
        return self.timeout_of(data())

    def shape(self) -> dict[str, object]:
        """What the action is, without its timeout and retry policy (the fingerprint's part)."""
        described = self.describe()
        del described["timeout"], described["retry"]
        return described

    def describe(self) -> dict[str, object]:
        """A stable, JSON-compatible description of everything about the action."""
        schema: object = None
        if self.command_model is not None:
            schema = self.command_model.model_json_schema()
        return {
            "kind": self.kind.value,
            "command_type": self.command_type,
            "destination": self.destination,
            "timeout": "per saga"
            if self.timeout_of is not None
            else None
            if self.timeout is None
            else self.timeout.total_seconds(),
            "retry": self.retry.describe(),
            "schema": schema,
            "handler": None
            if self.handler is None
            else getattr(self.handler, "__qualname__", repr(self.handler)),
        }


@dataclass(frozen=True, slots=True, eq=False)
class StepDefinition:
    """One step of a saga.

    Attributes:
        name: Unique within the saga.
        index: Position in the saga, from 0.
        action: What executing the step does.
        compensation: What undoing it does; ``None`` when there is nothing to undo.
        merge: Merges the reply data into the saga data.
        reply_model: Model that a successful reply's data must fit, if declared.
    """

    name: str
    index: int
    action: ActionSpec
    compensation: ActionSpec | None
    merge: ReplyMerger
    reply_model: type[BaseModel] | None = None

    def spec(self, kind: StepKind) -> ActionSpec | None:
        """The action for ``kind``: the step's own action or its compensation."""
        return self.action if kind is StepKind.EXECUTE else self.compensation


@dataclass(frozen=True, slots=True, eq=False)
class SagaDefinition:
    """A validated, immutable saga definition. Build one with ``SagaBuilder``.

    Attributes:
        name: The saga type.
        data_model: The pydantic model of the saga data.
        steps: The steps, in order.
        saga_timeout: Deadline for the whole saga to finish its forward steps, if any.
        fingerprint: Stable hash of the definition's shape; stored on every instance so a
            changed definition under in-flight sagas is detected.
        triggers: The bus events the saga reacts to (start, wait steps, cancellation). They
            are not part of the fingerprint: adding a ``cancel_on`` does not park running
            sagas.
    """

    name: str
    data_model: type[BaseModel]
    steps: tuple[StepDefinition, ...]
    saga_timeout: timedelta | None
    fingerprint: str
    triggers: tuple[EventTrigger, ...] = ()
    _by_name: dict[str, StepDefinition] = field(init=False, repr=False, compare=False)

    @property
    def topics(self) -> tuple[str, ...]:
        """The distinct topics of the saga's event triggers, in declaration order."""
        return tuple(dict.fromkeys(trigger.topic for trigger in self.triggers))

    def __post_init__(self) -> None:
        # A frozen dataclass: the lookup table is set once, through object.__setattr__.
        by_name = {step.name: step for step in reversed(self.steps)}  # the first of a name wins
        object.__setattr__(self, "_by_name", by_name)

    def step(self, name: str) -> StepDefinition | None:
        """The step called ``name``, or ``None``."""
        return self._by_name.get(name)

    def parse_data(
        self, data: Mapping[str, Any], *, saga_id: str | None = None, step: str | None = None
    ) -> BaseModel:
        """Validate ``data`` against the data model.

        Raises:
            InvalidSagaData: naming the saga, the step and each failing field.
        """
        try:
            return self.data_model.model_validate(data)
        except ValidationError as exc:
            raise InvalidSagaData(
                f"saga data does not fit {self.data_model.__name__}: {describe_validation(exc)}",
                saga_id=saga_id,
                saga_type=self.name,
                step=step,
                errors=[dict(e) for e in exc.errors(include_url=False)],
            ) from exc

    @property
    def local_steps(self) -> tuple[tuple[StepDefinition, StepKind, ActionSpec], ...]:
        """Every local action of this saga, with its step and kind."""
        found: list[tuple[StepDefinition, StepKind, ActionSpec]] = []
        for step in self.steps:
            for kind in StepKind:
                spec = step.spec(kind)
                if spec is not None and spec.kind is ActionKind.LOCAL:
                    found.append((step, kind, spec))
        return tuple(found)


class EventRole(StrEnum):
    """What a bus event does to the sagas it correlates to."""

    START = "start"
    """Starts a saga (``starts_on``); a duplicate finds the saga already there and does nothing."""
    ADVANCE = "advance"
    """Completes a step that waits for it (``wait_for``)."""
    CANCEL = "cancel"
    """Sends a running saga into compensation (``cancel_on``)."""


class MissingSagaPolicy(StrEnum):
    """What happens to an event that should correlate to a saga when no such saga exists."""

    IGNORE = "ignore"
    """Log a line and acknowledge the event."""
    DEAD_LETTER = "dead-letter"
    """Park the event in the dead-letter queue for a human."""
    START = "start"
    """Start the saga from the event's data, then apply the event to it."""


SagaIdsOf = Callable[[BaseModel], str | Iterable[str]]
"""Derives the id(s) of the saga(s) an event belongs to from the event."""

EventDataBuilder = Callable[[BaseModel], dict[str, Any]]
"""Builds saga data (JSON-compatible) from an event, to start a saga with."""


def event_name(model: type[BaseModel]) -> str:
    """The name of an event model on the wire: its class name."""
    return model.__name__


@dataclass(frozen=True, slots=True, eq=False)
class EventTrigger:
    """A bus event a saga definition reacts to.

    Attributes:
        role: Start a saga, complete a waiting step, or cancel a saga.
        name: The event's name (the model's class name unless declared).
        topic: The routing key the event is published with (on RabbitMQ: on the events
            exchange); the name by default.
        model: The event's pydantic model; the message body must fit it.
        saga_ids: The id(s) of the saga(s) the event belongs to.
        missing: What happens when a correlated saga does not exist (``START`` for start
            events).
        build_data: Saga data from the event, for ``START`` (``None`` when the event cannot
            start a saga).
        step: For ``ADVANCE``: the step that waits for the event.
    """

    role: EventRole
    name: str
    topic: str
    model: type[BaseModel]
    saga_ids: SagaIdsOf
    missing: MissingSagaPolicy
    build_data: EventDataBuilder | None = None
    step: str | None = None

    def ids(self, event: BaseModel) -> list[str]:
        """The saga ids ``event`` correlates to, in order, without repeats or empty ids."""
        found = self.saga_ids(event)
        values = [found] if isinstance(found, str) else list(found)
        unique: dict[str, None] = {}
        for value in values:
            text = str(value)
            if text:
                unique.setdefault(text, None)
        return list(unique)


def describe_validation(exc: ValidationError) -> str:
    """Render pydantic errors as ``field: message; field: message``."""
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def fingerprint_of(description: Mapping[str, object]) -> str:
    """A short, stable hash of a JSON-compatible description."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
