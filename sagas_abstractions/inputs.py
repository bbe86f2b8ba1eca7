"""Inputs to the saga engine: everything that can move a saga.

Each input carries the moment it is applied (``at``): the engine never reads a clock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sagas_abstractions.enums import StepKind
from sagas_abstractions.models import ErrorInfo

__all__ = [
    "Cancel",
    "Compensate",
    "EventInput",
    "EventReceived",
    "OperatorInput",
    "Resolve",
    "RetryCompensation",
    "RetryDue",
    "SagaInput",
    "SagaTimeout",
    "Start",
    "StepFailed",
    "StepInput",
    "StepSucceeded",
    "Timeout",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Start(BaseModel):
    """Start a new saga with the given data.

    ``message_id`` and ``source`` say what started it, for the history (a bus event:
    ``event:<name>`` and the event's message id).
    """

    model_config = _FROZEN

    saga_id: str = Field(min_length=1, max_length=200)
    data: dict[str, Any]
    at: datetime
    correlation_id: str | None = None
    trace_context: dict[str, str] = Field(default_factory=dict)
    message_id: str | None = None
    source: str | None = None


class _StepInput(BaseModel):
    model_config = _FROZEN

    step: str
    attempt: int = Field(ge=1)
    kind: StepKind
    at: datetime
    message_id: str | None = None


class StepSucceeded(_StepInput):
    """A participant replied that the step (or its compensation) succeeded.

    ``reply_token`` is the token the reply echoed (never shown in a ``repr``).
    """

    data: dict[str, Any] = Field(default_factory=dict)
    reply_token: str | None = Field(default=None, repr=False)


class StepFailed(_StepInput):
    """A participant replied that the step (or its compensation) failed.

    ``reply_token`` is the token the reply echoed (never shown in a ``repr``).
    """

    error: ErrorInfo
    reply_token: str | None = Field(default=None, repr=False)


class Timeout(_StepInput):
    """No reply arrived for this attempt before its deadline."""


class RetryDue(_StepInput):
    """The wait after this attempt is over: send the next one.

    ``attempt`` is the last attempt made, 0 when a step's first command was deferred (its
    destination's circuit was open) before any was sent.
    """

    attempt: int = Field(ge=0)


class EventReceived(BaseModel):
    """A bus event that a wait step of the saga waits for arrived.

    If the saga waits at that step, the step succeeds with the event's data; if the step has
    not begun yet, the event is kept on the step and applied when the saga gets there.
    """

    model_config = _FROZEN

    step: str
    event: str
    at: datetime
    message_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Cancel(BaseModel):
    """A bus event cancelled the saga: a running saga compensates what it has done."""

    model_config = _FROZEN

    event: str
    at: datetime
    message_id: str | None = None
    reason: str = ""


class SagaTimeout(BaseModel):
    """The saga-level deadline passed while the saga was still running forward."""

    model_config = _FROZEN

    at: datetime


class _OperatorInput(BaseModel):
    model_config = _FROZEN

    at: datetime
    actor: str = Field(min_length=1)
    reason: str = ""


class Compensate(_OperatorInput):
    """Operator: stop a running saga and compensate what it has done."""


class RetryCompensation(_OperatorInput):
    """Operator: try the failed compensation of a parked saga again (a new round of attempts)."""


class Resolve(_OperatorInput):
    """Operator: close a parked saga by hand (the fix was made outside the saga)."""


StepInput = StepSucceeded | StepFailed | Timeout | RetryDue
OperatorInput = Compensate | RetryCompensation | Resolve
EventInput = EventReceived | Cancel
SagaInput = (
    Start
    | StepSucceeded
    | StepFailed
    | Timeout
    | RetryDue
    | SagaTimeout
    | OperatorInput
    | EventReceived
    | Cancel
)
