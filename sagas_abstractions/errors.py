"""The error tree of sagas, drawn once.

Every error the library raises on purpose is a :class:`SagaError`. Each carries the saga id, the
saga type and the step it concerns (where known) as attributes and in its message, so a log line
alone tells an operator which saga to look at and what to do next::

    SagaError
    ├── InvalidDefinition        a SagaBuilder was given a definition that cannot run
    ├── InvalidSagaData          saga data does not fit the saga's data model
    ├── UnknownSagaType          no definition is registered under that saga type
    ├── DefinitionChanged        an in-flight saga started under another version of its definition
    ├── SagaNotFound             no saga instance with that id
    ├── SagaAlreadyExists        a saga with that id exists already (with another type or data)
    ├── InvalidOperation         an operator action that the saga's status does not allow
    ├── ConcurrencyConflict      an optimistic version check failed (reload and reapply)
    ├── DuplicateMessage         the inbox already holds that message id for that consumer
    ├── Unavailable              a store or broker cannot be reached: the worker's fault, not
    │                            the message's (buses hold the delivery, uncounted)
    ├── StoreError               the state store failed (adapters translate their driver errors)
    │   └── StoreUnavailable     it cannot be reached (also an Unavailable)
    ├── TransportError           the message bus failed
    │   └── PublishError         a publish was not confirmed (unroutable, nacked, timed out)
    │       └── BusUnavailable   ... because the connection is down or recovering (an Unavailable)
    ├── MessageDecodeError       a message on the wire does not follow the protocol
    │   ├── InvalidEvent         a bus event does not fit the event model a saga declared
    │   └── MessageTooLarge      a message body is over the size limit (never parsed)
    └── ParticipantError         raised by a step handler to fail its step with a code
        └── RetryableError       ... and to ask the orchestrator to retry it
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BusUnavailable",
    "ConcurrencyConflict",
    "DefinitionChanged",
    "DuplicateMessage",
    "InvalidDefinition",
    "InvalidEvent",
    "InvalidOperation",
    "InvalidSagaData",
    "MessageDecodeError",
    "MessageTooLarge",
    "ParticipantError",
    "PublishError",
    "RetryableError",
    "SagaAlreadyExists",
    "SagaError",
    "SagaNotFound",
    "StoreError",
    "StoreUnavailable",
    "TransportError",
    "Unavailable",
    "UnknownSagaType",
]


class SagaError(Exception):
    """Root of every error sagas raises on purpose.

    Attributes:
        saga_id: The saga instance concerned, when there is one.
        saga_type: The saga definition's name, when known.
        step: The step concerned, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        saga_id: str | None = None,
        saga_type: str | None = None,
        step: str | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.saga_type = saga_type
        self.step = step
        self.reason = message
        super().__init__(self._render(message))

    def _render(self, message: str) -> str:
        where = [
            f"{label}={value!r}"
            for label, value in (
                ("saga", self.saga_type),
                ("id", self.saga_id),
                ("step", self.step),
            )
            if value is not None
        ]
        return f"{message} [{', '.join(where)}]" if where else message

    def __reduce__(self) -> tuple[object, ...]:
        # Keep errors picklable (multiprocessing, pytest-xdist) despite keyword-only arguments.
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[SagaError], state: dict[str, object]) -> SagaError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._render(str(state.get("reason", ""))))  # noqa: SLF001
    return error


class InvalidDefinition(SagaError):  # noqa: N818 - reads as a sentence: raise InvalidDefinition
    """A saga definition cannot run; raised by ``SagaBuilder.build()``.

    Attributes:
        field: The data or command field concerned, when the problem is a field.
        problems: Every problem ``build()`` found (this one first); ``[self]`` when alone.
    """

    def __init__(
        self,
        message: str,
        *,
        saga_type: str | None = None,
        step: str | None = None,
        field: str | None = None,
    ) -> None:
        self.field = field
        self.problems: list[InvalidDefinition] = [self]
        super().__init__(message, saga_type=saga_type, step=step)

    def _render(self, message: str) -> str:
        rendered = super()._render(message)
        field = getattr(self, "field", None)
        if field and rendered.endswith("]"):
            return f"{rendered[:-1]}, field={field!r}]"
        return rendered


class InvalidSagaData(SagaError):  # noqa: N818
    """Saga data (at start, from a reply, or loaded from the store) does not fit the data model.

    A stored saga that no longer parses is parked by the orchestrator: status ``failed``, error
    code :attr:`park_code`.

    Attributes:
        errors: pydantic's list of field errors, when validation produced them.
    """

    park_code: ClassVar[str] = "unreadable_state"
    """The error code of a saga parked because its stored state does not parse."""

    def __init__(
        self,
        message: str,
        *,
        saga_id: str | None = None,
        saga_type: str | None = None,
        step: str | None = None,
        errors: list[dict[str, object]] | None = None,
    ) -> None:
        self.errors = errors or []
        super().__init__(message, saga_id=saga_id, saga_type=saga_type, step=step)


class UnknownSagaType(SagaError):  # noqa: N818
    """No saga definition is registered under the requested type.

    A stored saga of an unregistered type is parked by the orchestrator: status ``failed``,
    error code :attr:`park_code`.
    """

    park_code: ClassVar[str] = "unknown_saga_type"
    """The error code of a saga parked because its type is not registered."""


class DefinitionChanged(SagaError):  # noqa: N818
    """A saga instance started under a definition whose fingerprint differs from the current one.

    The orchestrator parks such a saga instead of guessing: status ``failed``, error code
    :attr:`park_code`.

    Attributes:
        started_with: Fingerprint stored on the instance.
        current: Fingerprint of the definition registered now.
    """

    park_code: ClassVar[str] = "definition_changed"
    """The error code of a saga parked because its definition changed under it."""

    def __init__(
        self,
        *,
        saga_id: str,
        saga_type: str,
        started_with: str,
        current: str,
    ) -> None:
        self.started_with = started_with
        self.current = current
        super().__init__(
            f"definition changed under an in-flight saga: started with {started_with}, "
            f"running {current}; give the changed definition a new saga name (e.g. 'orders-v2') "
            "and keep the old one registered until its sagas drain, or resolve this one by hand",
            saga_id=saga_id,
            saga_type=saga_type,
        )


class SagaNotFound(SagaError):  # noqa: N818
    """No saga instance has the requested id."""


class SagaAlreadyExists(SagaError):  # noqa: N818
    """A saga with the requested id exists already with another type."""


class InvalidOperation(SagaError):  # noqa: N818
    """An operator action that the saga's current status does not allow."""


class ConcurrencyConflict(SagaError):  # noqa: N818
    """The saga changed since it was loaded: the optimistic version check failed.

    The orchestrator reloads the saga in a fresh session and reapplies the input (bounded).

    Attributes:
        expected_version: The version the writer loaded.
        actual_version: The version found in the store (``None`` when unknown or deleted).
    """

    def __init__(
        self,
        *,
        saga_id: str,
        expected_version: int | None,
        actual_version: int | None,
        saga_type: str | None = None,
    ) -> None:
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"saga changed concurrently: expected version {expected_version}, "
            f"found {actual_version}",
            saga_id=saga_id,
            saga_type=saga_type,
        )


class DuplicateMessage(SagaError):  # noqa: N818
    """The inbox already records this message id for this consumer: it was processed before.

    Receivers ack such a message and do nothing else.

    Attributes:
        consumer: The consumer whose inbox holds the id.
        message_id: The duplicate message id.
    """

    def __init__(self, *, consumer: str, message_id: str, saga_id: str | None = None) -> None:
        self.consumer = consumer
        self.message_id = message_id
        super().__init__(
            f"message {message_id!r} was already processed by {consumer!r}", saga_id=saga_id
        )


class StoreError(SagaError):
    """The saga store failed; the adapter's driver error is chained as ``__cause__``."""


class Unavailable(SagaError):  # noqa: N818 - reads as a state
    """Something the handler needs (the store, the broker) cannot be reached right now.

    The failure is the worker's own, not the message's: a bus whose handler raises it does not
    count the delivery against the message's delivery limit. It holds the message, pauses the
    subscription's other deliveries and tries again, with backoff, until the handler gets
    through (see :meth:`MessageBus.subscribe <sagas_abstractions.MessageBus.subscribe>`).
    Handing it back instead would spend the message's delivery budget in a tight loop for as
    long as the outage lasts, and dead-letter a genuine message.
    """


class StoreUnavailable(StoreError, Unavailable):  # noqa: N818 - reads as a state
    """The store cannot be reached: it refuses connections, dropped them, or has none to spare.

    An :class:`Unavailable`: buses hold the delivery, uncounted, until the store answers.
    """


class TransportError(SagaError):
    """The message bus failed; the adapter's client error is chained as ``__cause__``."""


class PublishError(TransportError):
    """A message was not confirmed by the broker (unroutable, nacked or timed out).

    The message may or may not have reached the broker: the outbox publishes it again under the
    same message id, and receivers deduplicate it.
    """


class BusUnavailable(PublishError, Unavailable):  # noqa: N818 - reads as a state
    """A publish failed because the broker connection or channel is down or recovering.

    Nothing about the message is wrong: an :class:`Unavailable`, so a handler that raises it
    (a participant whose reply could not go out) has its delivery held, uncounted, and tried
    again once the bus is back; the receivers deduplicate the reply if it went out after all.
    """


class MessageDecodeError(SagaError):
    """A message on the wire does not follow the sagas protocol (docs/protocol.md)."""


class InvalidEvent(MessageDecodeError):  # noqa: N818
    """A bus event does not fit the event model a saga declared (or yields no usable saga id).

    The event is dead-lettered (never retried: it cannot get better); the message names the
    saga type, the event and each failing field.
    """


class MessageTooLarge(MessageDecodeError):  # noqa: N818
    """A message body is over the deployment's size limit (``SAGAS_MAX_MESSAGE_BYTES``).

    It is dead-lettered with this error as the reason, without being parsed: it cannot get
    better, and parsing it is what the limit guards against.

    Attributes:
        size: The body's size in bytes.
        limit: The limit in bytes.
    """

    def __init__(
        self,
        message: str,
        *,
        size: int,
        limit: int,
        saga_id: str | None = None,
    ) -> None:
        self.size = size
        self.limit = limit
        super().__init__(message, saga_id=saga_id)


class ParticipantError(SagaError):
    """Raise from a step handler to fail the step with a code the saga can see.

    A plain ``ParticipantError`` is permanent: the saga compensates. Raise
    :class:`RetryableError` instead when trying again later can succeed.

    Attributes:
        code: A short machine-readable reason, for example ``"out_of_stock"``.
        retryable: Whether the orchestrator may retry the step.
    """

    retryable: bool = False

    def __init__(self, message: str, *, code: str = "step_failed") -> None:
        self.code = code
        super().__init__(message)


class RetryableError(ParticipantError):
    """Raise from a step handler for a transient failure the orchestrator should retry."""

    retryable = True

    def __init__(self, message: str, *, code: str = "transient") -> None:
        super().__init__(message, code=code)
