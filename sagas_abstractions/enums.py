"""Enumerations shared by every package; their values belong to the wire protocol and schema."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "EventKind",
    "ReplyStatus",
    "RouteKind",
    "SagaStatus",
    "StepKind",
    "StepStatus",
    "WaitKind",
]


class SagaStatus(StrEnum):
    """Lifecycle status of a saga instance.

    ``running`` and ``compensating`` are active; ``completed``, ``compensated`` and ``resolved``
    are terminal; ``failed`` is parked: compensation could not finish and an operator must act
    (retry the compensation, or resolve the saga by hand).
    """

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    RESOLVED = "resolved"

    @property
    def is_terminal(self) -> bool:
        """Whether nothing more can happen to a saga in this status."""
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """Whether the saga is still moving on its own (running or compensating)."""
        return self in _ACTIVE


_TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.RESOLVED})
_ACTIVE = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})


class StepStatus(StrEnum):
    """Status of one step within a saga instance."""

    PENDING = "pending"
    """Not started yet."""
    RUNNING = "running"
    """Its command is out; the outcome is not known yet."""
    SUCCEEDED = "succeeded"
    """The participant replied with success; its effect is applied."""
    FAILED = "failed"
    """The participant replied with a failure: by protocol, no effect was applied."""
    TIMED_OUT = "timed_out"
    """No reply in time and no attempt left: the effect may or may not be applied."""
    COMPENSATING = "compensating"
    """Its compensation command is out."""
    COMPENSATED = "compensated"
    """Its compensation succeeded."""
    COMPENSATION_FAILED = "compensation_failed"
    """Its compensation ran out of attempts: the saga is parked as failed."""
    SKIPPED = "skipped"
    """Its effect is applied but it has no compensation to run."""


class StepKind(StrEnum):
    """Whether a command executes a step or compensates it."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


class WaitKind(StrEnum):
    """What an active saga is waiting for; its ``deadline_at`` belongs to this wait."""

    REPLY = "reply"
    """A reply to the current command; at the deadline the attempt times out."""
    RETRY = "retry"
    """The backoff before the next attempt; at the deadline the command is sent again."""


class ReplyStatus(StrEnum):
    """Outcome a participant reports in a reply."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


class RouteKind(StrEnum):
    """The kind of address a message travels to; each transport maps kinds onto its topology."""

    COMMAND = "command"
    """To a participant destination (for example ``inventory``)."""
    REPLY = "reply"
    """To an orchestrator group's reply queue."""
    EVENT = "event"
    """To the saga-events topic; the key is ``<saga-type>.<event>``."""
    DEAD_LETTER = "dead-letter"
    """To the dead-letter queue, for a human."""


class EventKind(StrEnum):
    """Kinds of saga event published to the events topic (routing key ``<saga-type>.<kind>``)."""

    STARTED = "started"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_RETRY_SCHEDULED = "step_retry_scheduled"
    STEP_DEFERRED = "step_deferred"
    COMPENSATING = "compensating"
    STEP_COMPENSATED = "step_compensated"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    RESOLVED = "resolved"
    OPERATOR_ACTION = "operator_action"
