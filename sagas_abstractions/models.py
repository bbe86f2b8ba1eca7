"""The saga instance record and its audit trail: what every store persists."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sagas_abstractions.enums import SagaStatus, StepKind, StepStatus, WaitKind

__all__ = ["ErrorInfo", "HistoryEntry", "SagaInstance", "StepState"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ErrorInfo(BaseModel):
    """Why a step failed, as a participant (or the orchestrator) reported it.

    Attributes:
        code: Short machine-readable reason, for example ``out_of_stock`` or ``timeout``.
        message: Human-readable explanation.
        retryable: Whether trying again may succeed.
    """

    model_config = _FROZEN

    code: str = Field(min_length=1, max_length=200)
    message: str = ""
    retryable: bool = False


class StepState(BaseModel):
    """Progress of one step of one saga instance.

    Attributes:
        name: The step's name in the definition.
        status: Where the step is in its own lifecycle.
        attempts: Execute attempts made so far (monotonic: attempt numbers are never reused).
        compensation_attempts: Compensation attempts made so far (monotonic too).
        result: Data of the successful reply, as received.
        error: The last error of this step (execution or compensation).
        started_at: When the first attempt was sent.
        finished_at: When the step reached its last status.
        early_event: For a step that waits for a bus event: the event's data when it arrived
            before the step began; the step succeeds with it as soon as it begins.
        reply_token: The secret the reply to the step's current command must echo (see
            :attr:`~sagas_abstractions.CommandMessage.reply_token`); ``None`` when that command
            asked for none. Never shown in a ``repr``; never log it.
    """

    model_config = _FROZEN

    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = Field(default=0, ge=0)
    compensation_attempts: int = Field(default=0, ge=0)
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    early_event: dict[str, Any] | None = None
    reply_token: str | None = Field(default=None, repr=False)


class SagaInstance(BaseModel):
    """The durable state of one saga: everything the engine needs to decide the next move.

    Instances are immutable; the engine returns a new one for every transition and the store
    persists it with an optimistic check on ``version``.

    Attributes:
        saga_id: Unique id of this saga instance.
        saga_type: Name of the saga definition.
        definition_version: Fingerprint of the definition the saga started under.
        status: Lifecycle status.
        current_step: Index of the step being executed or compensated.
        attempt: Attempt number of the current command (a fencing token: replies and timeouts
            for any other attempt are stale).
        attempt_base: Attempts made before the current round (an operator retry starts a new
            round without reusing attempt numbers); the retry policy counts ``attempt -
            attempt_base``.
        wait: What the saga waits for, when active.
        deadline_at: When the current wait ends (reply timeout or retry due).
        saga_deadline_at: When the whole saga times out, if it has a saga-level timeout.
        data: The saga data, as JSON-compatible values of the definition's data model.
        steps: Per-step progress, in definition order.
        error: The error that sent the saga into compensation or parked it.
        version: Optimistic concurrency version; 1 on creation, +1 per transition.
        created_at: When the saga started.
        updated_at: When the saga last changed.
        correlation_id: Caller-supplied id linking the saga to a business entity or request.
        trace_context: W3C trace context of the saga's start, so later spans can link to it.
    """

    model_config = _FROZEN

    saga_id: str = Field(min_length=1, max_length=200)
    saga_type: str = Field(min_length=1, max_length=200)
    definition_version: str
    status: SagaStatus
    current_step: int = Field(ge=0)
    attempt: int = Field(default=1, ge=0)
    attempt_base: int = Field(default=0, ge=0)
    wait: WaitKind | None = None
    deadline_at: datetime | None = None
    saga_deadline_at: datetime | None = None
    data: dict[str, Any]
    steps: tuple[StepState, ...]
    error: ErrorInfo | None = None
    version: int = Field(default=1, ge=1)
    created_at: datetime
    updated_at: datetime
    correlation_id: str | None = None
    trace_context: dict[str, str] = Field(default_factory=dict)

    @property
    def current_step_name(self) -> str | None:
        """Name of the current step, or ``None`` once the saga is past its last step."""
        return self.steps[self.current_step].name if self.current_step < len(self.steps) else None

    @property
    def current_kind(self) -> StepKind:
        """Whether the current command executes or compensates the current step."""
        return StepKind.COMPENSATE if self.status is SagaStatus.COMPENSATING else StepKind.EXECUTE

    @property
    def next_deadline_at(self) -> datetime | None:
        """The earliest deadline that can move this saga, or ``None``.

        Stores index this value so the timeout service finds due sagas with one range scan.
        The saga-level deadline only counts while the saga runs forward: compensation has its
        own per-command timeouts and must be allowed to finish.
        """
        status = self.status
        if not status.is_active:
            return None
        deadline = self.deadline_at
        saga_deadline = self.saga_deadline_at
        if (
            status is SagaStatus.RUNNING
            and saga_deadline is not None
            and (deadline is None or saga_deadline < deadline)
        ):
            return saga_deadline
        return deadline


class HistoryEntry(BaseModel):
    """One row of a saga's append-only audit trail: an input and what it did.

    Attributes:
        saga_id: The saga concerned.
        version: The saga version after this entry (unchanged for ignored inputs).
        at: When the input was applied.
        input: The input's kind, for example ``StepSucceeded`` or ``Timeout``.
        outcome: ``applied``, ``stale`` (for a superseded attempt or a finished saga), or
            ``rejected``.
        from_status: Status before the input.
        to_status: Status after the input.
        step: The step the input concerned, when any.
        attempt: The attempt the input concerned, when any.
        kind: Execute or compensate, when the input concerned a command.
        reason: Why, in words (an error message, an operator's note).
        actor: Who acted, for operator actions.
        message_id: The incoming message id, when the input came as a message.
    """

    model_config = _FROZEN

    saga_id: str
    version: int
    at: datetime
    input: str
    outcome: str = "applied"
    from_status: SagaStatus | None = None
    to_status: SagaStatus
    step: str | None = None
    attempt: int | None = None
    kind: StepKind | None = None
    reason: str | None = None
    actor: str | None = None
    message_id: str | None = None
