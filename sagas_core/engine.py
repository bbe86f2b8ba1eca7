"""The pure saga engine: ``decide(definition, instance, input) -> Decision``.

No I/O, no clock, no randomness: every input carries its moment, retry jitter is derived from the
saga id. The orchestrator (the imperative shell) loads, decides, saves and dispatches.

Rules that hold for every status and input (the property tests check them):

* An input for an attempt, step or kind that is not the current one is **stale**: the saga does
  not change and the input is recorded in history as stale. Attempt numbers are fencing tokens
  and never reused, so a duplicate of an applied input is always stale.
* Terminal sagas (completed, compensated, resolved) never change and never send again. A
  ``failed`` saga waits for an operator.
* A reply to a command that carried a reply token is applied only if it echoes that token
  (compared in constant time); otherwise it is **rejected**: the saga does not change, the reply
  is recorded in history as rejected (never with the token) and the decision names why, so the
  shell dead-letters it. The token of a step's previous attempt does not count. A step whose
  command carried no token (sent before tokens existed) takes a reply without one.
* Compensation runs in reverse step order, at most once per step, for every step whose effect
  is or may be applied: succeeded, or still without an answer (in flight or timed out). A step
  whose participant replied ``failed`` applied nothing (docs/protocol.md) and is not compensated.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import pydantic_core
from pydantic import BaseModel, ValidationError

from sagas_abstractions import (
    Cancel,
    CommandMessage,
    Compensate,
    DeadLetterMessage,
    ErrorInfo,
    EventKind,
    EventReceived,
    HistoryEntry,
    InvalidOperation,
    InvalidSagaData,
    Resolve,
    RetryCompensation,
    RetryDue,
    SagaEvent,
    SagaInput,
    SagaInstance,
    SagaNotFound,
    SagaStatus,
    SagaTimeout,
    Start,
    StepFailed,
    StepKind,
    StepState,
    StepStatus,
    StepSucceeded,
    Timeout,
    UnknownSagaType,
    WaitKind,
)
from sagas_core._models import replace, trusted
from sagas_core.definition import ActionKind, describe_validation
from sagas_core.retry import TIMEOUT_CODE

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from sagas_core.definition import ActionSpec, SagaDefinition, StepDefinition

__all__ = [
    "CANCELLED_BY_EVENT_CODE",
    "DATA_TOO_LARGE_CODE",
    "INVALID_PAYLOAD_CODE",
    "INVALID_REPLY_CODE",
    "INVALID_TIMEOUT_CODE",
    "OPERATOR_CODE",
    "SAGA_TIMEOUT_CODE",
    "Decision",
    "command_message_id",
    "decide",
    "due_input",
    "idempotency_key",
    "parked",
    "rejected",
    "resolved_without_definition",
]

SAGA_TIMEOUT_CODE = "saga_timeout"
"""Error code recorded when the saga-level deadline passes."""
INVALID_REPLY_CODE = "invalid_reply"
"""Error code recorded when a successful reply's data does not fit the saga."""
INVALID_PAYLOAD_CODE = "invalid_command_payload"
INVALID_TIMEOUT_CODE = "invalid_timeout"
"""Error code recorded when a command could not be built from the saga data."""
OPERATOR_CODE = "operator_compensate"
"""Error code recorded when an operator compensates a running saga."""
CANCELLED_BY_EVENT_CODE = "cancelled_by_event"
"""Error code of a saga a bus event (``cancel_on``) sent into compensation."""
DATA_TOO_LARGE_CODE = "saga_data_too_large"
"""Error code recorded when a successful reply would grow the saga past its data size limit."""

_MAY_BE_APPLIED = frozenset({StepStatus.SUCCEEDED, StepStatus.RUNNING, StepStatus.TIMED_OUT})
# Tuples, not ``A | B``: a union in isinstance is built anew on every call.
_STEP_INPUTS = (StepSucceeded, StepFailed, Timeout, RetryDue)
_OPERATOR_INPUTS = (Compensate, RetryCompensation, Resolve)
_REPLIES = (StepSucceeded, StepFailed)
_KIND_TEXT = {kind: kind.value for kind in StepKind}
_NO_CIRCUITS: Mapping[str, datetime] = MappingProxyType({})
# Members asked for on every step, as module constants: on Python 3.11 looking a member up on
# its class (``StepKind.EXECUTE``) takes EnumType.__getattr__'s slow path (see codec.py).
_EXECUTE, _COMPENSATE = StepKind.EXECUTE, StepKind.COMPENSATE
_COMPENSATING, _FAILED, _COMPLETED = (
    SagaStatus.COMPENSATING,
    SagaStatus.FAILED,
    SagaStatus.COMPLETED,
)
_REPLY, _RETRY = WaitKind.REPLY, WaitKind.RETRY
_STEP_RUNNING, _STEP_SUCCEEDED = StepStatus.RUNNING, StepStatus.SUCCEEDED
_STEP_COMPLETED, _SAGA_COMPLETED = EventKind.STEP_COMPLETED, EventKind.COMPLETED
_WAIT_ACTION = ActionKind.WAIT
# ``status.is_active``/``is_terminal`` without the property's Python call, derived from them.
_ACTIVE = frozenset(status for status in SagaStatus if status.is_active)
_TERMINAL = frozenset(status for status in SagaStatus if status.is_terminal)
"""``kind.value`` without the enum property's Python call (ids are made on every step)."""
_COMPENSATION_STARTED = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED})


@dataclass(frozen=True, slots=True)
class Decision:
    """What one input does to one saga.

    Attributes:
        instance: The saga after the input (the same object when nothing changed).
        changed: Whether the saga changed (its version was incremented).
        commands: Commands to send, after the change is committed.
        events: Saga events to publish.
        dead_letters: Compensations to park in the dead-letter queue.
        history: Audit rows to append (one per input, applied, stale or rejected).
        rejected: Why a reply was rejected (it did not authenticate); the shell dead-letters it
            and must not record its message id as processed, so the genuine reply with the
            same (predictable) id still gets in. ``None`` for every other decision.
    """

    instance: SagaInstance
    changed: bool
    commands: tuple[CommandMessage, ...] = ()
    events: tuple[SagaEvent, ...] = ()
    dead_letters: tuple[DeadLetterMessage, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    rejected: str | None = None


def _timeout_error(step: str, exc: Exception) -> ErrorInfo:
    return ErrorInfo(
        code=INVALID_TIMEOUT_CODE,
        message=f"could not compute the timeout of step {step!r}: {type(exc).__name__}: {exc}",
    )


def command_message_id(saga_id: str, step: str, kind: StepKind, attempt: int) -> str:
    """The deterministic id of a command: the same decision always yields the same id."""
    return f"{saga_id}:{step}:{_KIND_TEXT[kind]}:{attempt}"


def idempotency_key(saga_id: str, step: str, kind: StepKind) -> str:
    """Stable across retries of one step's execution (or compensation), distinct between them."""
    return f"{saga_id}:{step}" if kind is _EXECUTE else f"{saga_id}:{step}:compensate"


def due_input(instance: SagaInstance, now: datetime) -> Timeout | RetryDue | SagaTimeout | None:
    """The input that a passed deadline produces for ``instance`` at ``now``, if any."""
    if not instance.status.is_active:
        return None
    if (
        instance.status is SagaStatus.RUNNING
        and instance.saga_deadline_at is not None
        and instance.saga_deadline_at <= now
        and (instance.deadline_at is None or instance.saga_deadline_at <= instance.deadline_at)
    ):
        return SagaTimeout(at=now)
    if instance.deadline_at is None or instance.deadline_at > now or instance.wait is None:
        return None
    step = instance.current_step_name
    if step is None:  # pragma: no cover - an active saga always has a current step
        return None
    kind = instance.current_kind
    if instance.wait is WaitKind.REPLY:
        return Timeout(step=step, attempt=instance.attempt, kind=kind, at=now)
    return RetryDue(step=step, attempt=instance.attempt, kind=kind, at=now)


def decide(
    definition: SagaDefinition,
    instance: SagaInstance | None,
    event: SagaInput,
    *,
    circuits: Mapping[str, datetime] | None = None,
    reply_token: str | None = None,
    max_data_bytes: int | None = None,
) -> Decision:
    """Apply one input to one saga and return the decision. Pure: no I/O, no clock, no random.

    Args:
        definition: The saga's definition.
        instance: The saga as loaded; ``None`` only for :class:`Start` of a new saga.
        event: The input.
        circuits: Destinations whose circuit is open, each with when a command may be sent
            again: a command for one of them is deferred to that moment (the saga waits with a
            retry deadline and no attempt is used) instead of being sent.
        reply_token: The token the command this decision sends (a decision sends at most one)
            asks its reply to echo, kept on the step: an unguessable value the caller makes
            (``secrets.token_urlsafe``), a new one for every decision. ``None`` sends a command
            that asks for none, whose reply is taken without authentication.
        max_data_bytes: The most bytes the saga data, and the data of one reply kept as its
            step's result, may take as JSON; ``None``: no limit. A successful reply that would
            pass it fails its step (``saga_data_too_large``) and the saga compensates.

    Raises:
        InvalidSagaData: ``Start`` data does not fit the data model, or is over
            ``max_data_bytes``.
        SagaNotFound: A non-start input for a saga that does not exist.
        UnknownSagaType: The instance belongs to another definition.
        InvalidOperation: An operator action the saga's status does not allow.
    """
    if isinstance(event, Start):
        if instance is not None:
            return _ignored(instance, event, "saga already started", outcome="duplicate")
        return _start(definition, event, circuits or _NO_CIRCUITS, reply_token, max_data_bytes)
    if instance is None:
        raise SagaNotFound("no saga to apply the input to", saga_type=definition.name)
    if instance.saga_type != definition.name:
        raise UnknownSagaType(
            f"instance is a {instance.saga_type!r} saga, not {definition.name!r}",
            saga_id=instance.saga_id,
            saga_type=instance.saga_type,
        )
    return _Transition(
        definition,
        instance,
        event,
        circuits=circuits or _NO_CIRCUITS,
        reply_token=reply_token,
        max_data_bytes=max_data_bytes,
    ).run()


def parked(
    instance: SagaInstance,
    *,
    error: ErrorInfo,
    at: datetime,
    reason: str,
    message_id: str | None = None,
) -> Decision:
    """Park a saga the orchestrator cannot move: ``failed`` with ``error``, deadlines cleared.

    Needs no definition: it is for sagas whose definition is missing or changed, or whose
    stored state does not parse (``instance`` may then be a reader's partial view; the store
    writes such a decision with a ``status_only`` change). History records the input ``Park``.

    Args:
        instance: The saga as stored (or as a reader shows it).
        error: Why it is parked (``code`` is the park code of the problem).
        at: When.
        reason: The problem in words, for history.
        message_id: The incoming message that found the problem, if any.
    """
    return _forced(
        instance,
        status=SagaStatus.FAILED,
        error=error,
        at=at,
        input_name="Park",
        reason=reason,
        actor=None,
        message_id=message_id,
        event_kind=EventKind.FAILED,
        detail=reason,
    )


def rejected(instance: SagaInstance, event: StepSucceeded | StepFailed, reason: str) -> Decision:
    """Reject a reply the shell found unauthentic (a wrong publisher): recorded, never applied.

    The same decision as ``decide`` makes for a reply without its command's token.
    """
    return _ignored(instance, event, reason, outcome="rejected")


def resolved_without_definition(instance: SagaInstance, event: Resolve) -> Decision:
    """Resolve a failed saga by hand without its definition (exactly as ``decide`` would).

    Operators can close a parked saga whose type is unregistered, whose definition changed or
    whose stored state does not parse.

    Raises:
        InvalidOperation: The saga is not ``failed``.
    """
    if instance.status is not SagaStatus.FAILED:
        raise InvalidOperation(
            f"cannot resolve a {instance.status.value} saga (only a failed one)",
            saga_id=instance.saga_id,
            saga_type=instance.saga_type,
        )
    return _forced(
        instance,
        status=SagaStatus.RESOLVED,
        error=instance.error,
        at=event.at,
        input_name=type(event).__name__,
        reason=event.reason or None,
        actor=event.actor,
        message_id=None,
        event_kind=EventKind.RESOLVED,
        detail=f"resolved by {event.actor}: {event.reason}",
    )


def _forced(
    instance: SagaInstance,
    *,
    status: SagaStatus,
    error: ErrorInfo | None,
    at: datetime,
    input_name: str,
    reason: str | None,
    actor: str | None,
    message_id: str | None,
    event_kind: EventKind,
    detail: str | None,
) -> Decision:
    version = instance.version + 1
    changed = replace(
        instance,
        {
            "status": status,
            "error": error,
            "wait": None,
            "deadline_at": None,
            "version": version,
            "updated_at": at,
        },
    )
    event = SagaEvent(
        event_id=f"{instance.saga_id}:{version}:0",
        saga_id=instance.saga_id,
        saga_type=instance.saga_type,
        kind=event_kind,
        status=status,
        step=instance.current_step_name,
        attempt=None,
        version=version,
        at=at,
        error=error,
        detail=detail,
    )
    history = HistoryEntry(
        saga_id=instance.saga_id,
        version=version,
        at=at,
        input=input_name,
        outcome="applied",
        from_status=instance.status,
        to_status=status,
        step=instance.current_step_name,
        reason=reason,
        actor=actor,
        message_id=message_id,
    )
    return Decision(instance=changed, changed=True, events=(event,), history=(history,))


def _start(
    definition: SagaDefinition,
    event: Start,
    circuits: Mapping[str, datetime],
    reply_token: str | None,
    max_data_bytes: int | None,
) -> Decision:
    data = definition.parse_data(event.data, saga_id=event.saga_id)
    saga_deadline = None if definition.saga_timeout is None else event.at + definition.saga_timeout
    dumped = data.model_dump(mode="json")
    if max_data_bytes is not None:
        size = len(pydantic_core.to_json(dumped))
        if size > max_data_bytes:
            raise InvalidSagaData(
                f"the start data takes {size} bytes as JSON, over the saga data limit of "
                f"{max_data_bytes} bytes (SAGAS_MAX_SAGA_DATA_BYTES)",
                saga_id=event.saga_id,
                saga_type=definition.name,
            )
    # Every value comes from the validated input and the definition (its name is checked by
    # the builder against the same limits), so the instance is not validated again.
    seed = trusted(
        SagaInstance,
        {
            "saga_id": event.saga_id,
            "saga_type": definition.name,
            "definition_version": definition.fingerprint,
            "status": SagaStatus.RUNNING,
            "current_step": 0,
            "attempt": 0,
            "attempt_base": 0,
            "wait": None,
            "deadline_at": None,
            "saga_deadline_at": saga_deadline,
            "data": dumped,
            "steps": _pending_steps(definition.steps),
            "error": None,
            "version": 1,
            "created_at": event.at,
            "updated_at": event.at,
            "correlation_id": event.correlation_id,
            "trace_context": dict(event.trace_context),
        },
    )
    transition = _Transition(
        definition,
        seed,
        event,
        created=True,
        circuits=circuits,
        reply_token=reply_token,
        max_data_bytes=max_data_bytes,
    )
    transition.seed_parsed(dumped, data)
    transition.emit(EventKind.STARTED)
    transition.begin_step(0)
    return transition.finish()


@lru_cache(maxsize=256)
def _pending_steps(steps: tuple[StepDefinition, ...]) -> tuple[StepState, ...]:
    """The steps of a new saga: immutable, so every saga of a definition shares one tuple."""
    return tuple(_pending_step(step.name) for step in steps)


def _pending_step(name: str) -> StepState:
    return trusted(
        StepState,
        {
            "name": name,
            "status": StepStatus.PENDING,
            "attempts": 0,
            "compensation_attempts": 0,
            "result": None,
            "error": None,
            "started_at": None,
            "finished_at": None,
            "early_event": None,
            "reply_token": None,
        },
    )


def _history(
    instance: SagaInstance,
    event: SagaInput,
    *,
    version: int,
    outcome: str,
    from_status: SagaStatus | None,
    to_status: SagaStatus,
    reason: str | None,
) -> HistoryEntry:
    step = attempt = kind = actor = message_id = None
    if isinstance(event, _STEP_INPUTS):
        step, attempt, kind, message_id = event.step, event.attempt, event.kind, event.message_id
    elif isinstance(event, _OPERATOR_INPUTS):
        actor = event.actor
    elif isinstance(event, EventReceived):
        step, message_id, actor = event.step, event.message_id, f"event:{event.event}"
    elif isinstance(event, Cancel):
        message_id, actor = event.message_id, f"event:{event.event}"
    elif isinstance(event, Start):
        message_id, actor = event.message_id, event.source
    return trusted(
        HistoryEntry,
        {
            "saga_id": instance.saga_id,
            "version": version,
            "at": event.at,
            "input": type(event).__name__,
            "outcome": outcome,
            "from_status": from_status,
            "to_status": to_status,
            "step": step,
            "attempt": attempt,
            "kind": kind,
            "reason": reason,
            "actor": actor,
            "message_id": message_id,
        },
    )


def _ignored(
    instance: SagaInstance, event: SagaInput, reason: str, *, outcome: str = "stale"
) -> Decision:
    return Decision(
        instance=instance,
        changed=False,
        rejected=reason if outcome == "rejected" else None,
        history=(
            _history(
                instance,
                event,
                version=instance.version,
                outcome=outcome,
                from_status=instance.status,
                to_status=instance.status,
                reason=reason,
            ),
        ),
    )


class _PendingEvent(NamedTuple):
    kind: EventKind
    status: SagaStatus
    step: str | None
    error: ErrorInfo | None
    detail: str | None
    attempt: int | None


class _Transition:
    """Working state of one decision; every mutation goes through here, then ``finish()``."""

    __slots__ = (
        "_parsed",
        "at",
        "attempt",
        "attempt_base",
        "before",
        "circuits",
        "commands",
        "created",
        "current",
        "data",
        "dead_letters",
        "deadline_at",
        "definition",
        "error",
        "event",
        "max_data_bytes",
        "pending_events",
        "reason",
        "reply_token",
        "status",
        "steps",
        "wait",
    )

    def __init__(
        self,
        definition: SagaDefinition,
        instance: SagaInstance,
        event: SagaInput,
        *,
        created: bool = False,
        circuits: Mapping[str, datetime] | None = None,
        reply_token: str | None = None,
        max_data_bytes: int | None = None,
    ) -> None:
        self.reply_token = reply_token
        self.max_data_bytes = max_data_bytes
        self.circuits: Mapping[str, datetime] = circuits or _NO_CIRCUITS
        self.definition = definition
        self.before = instance
        self.event = event
        self.at = event.at
        self.created = created
        self.status = instance.status
        self.current = instance.current_step
        self.attempt = instance.attempt
        self.attempt_base = instance.attempt_base
        self.wait = instance.wait
        self.deadline_at = instance.deadline_at
        self.data = instance.data
        self.steps = list(instance.steps)
        self.error = instance.error
        self.commands: list[CommandMessage] = []
        self.dead_letters: list[DeadLetterMessage] = []
        self.pending_events: list[_PendingEvent] = []
        self.reason: str | None = None
        self._parsed: tuple[dict[str, Any], BaseModel] | None = None

    # ------------------------------------------------------------------ dispatch on the input

    def run(self) -> Decision:  # noqa: PLR0911 - one branch per input kind reads best
        event = self.event
        if isinstance(event, _OPERATOR_INPUTS):
            return self.operator(event)
        if self.status in _TERMINAL:
            return _ignored(self.before, event, f"saga is {self.status.value}")
        if isinstance(event, SagaTimeout):
            return self.saga_timeout(event)
        if isinstance(event, Cancel):
            return self.cancelled(event)
        if isinstance(event, EventReceived):
            return self.event_received(event)
        if isinstance(event, Start):  # pragma: no cover - handled by decide()
            return _ignored(self.before, event, "saga already started", outcome="duplicate")
        index = self.index_of(event.step)
        if index is None:
            return _ignored(self.before, event, f"unknown step {event.step!r}")
        if self.status is _FAILED:
            return self.failed_saga_input(event, index)
        if index != self.current or event.kind is not self.kind:
            return _ignored(
                self.before,
                event,
                f"not the current step and kind ({self.before.current_step_name}, "
                f"{self.kind.value})",
            )
        if event.attempt != self.attempt:
            return _ignored(
                self.before, event, f"superseded attempt (current attempt is {self.attempt})"
            )
        if isinstance(event, _REPLIES):
            refused = self.unauthenticated(index, event)
            if refused is not None:
                return _ignored(self.before, event, refused, outcome="rejected")
        if isinstance(event, StepSucceeded):
            if self.wait is _RETRY and not self.last_attempt_timed_out(index):
                return _ignored(self.before, event, "attempt already failed")
            return self.succeeded(index, event.data)
        if isinstance(event, StepFailed):
            if self.wait is not _REPLY:
                return _ignored(self.before, event, "attempt already failed")
            self.reason = event.error.message or event.error.code
            return self.failed(index, event.error)
        if isinstance(event, Timeout):
            if self.wait is not WaitKind.REPLY or not self.deadline_passed():
                return _ignored(self.before, event, "no reply deadline has passed")
            return self.timed_out(index)
        # RetryDue
        if self.wait is not WaitKind.RETRY or not self.deadline_passed():
            return _ignored(self.before, event, "no retry is due")
        self.send(index, self.kind, new_round=False)
        return self.finish()

    @property
    def kind(self) -> StepKind:
        return _COMPENSATE if self.status is _COMPENSATING else _EXECUTE

    def index_of(self, name: str) -> int | None:
        step = self.definition.step(name)
        return None if step is None else step.index

    def parsed_data(self) -> BaseModel:
        """The saga data as its model, validated once per transition (and after each merge)."""
        cached = self._parsed
        if cached is not None and cached[0] is self.data:
            return cached[1]
        model = self.definition.parse_data(self.data, saga_id=self.before.saga_id)
        self._parsed = (self.data, model)
        return model

    def seed_parsed(self, data: dict[str, Any], model: BaseModel) -> None:
        """``model`` is ``data`` validated already: ``parsed_data()`` needs not do it again."""
        self._parsed = (data, model)

    def deadline_passed(self) -> bool:
        return self.deadline_at is not None and self.at >= self.deadline_at

    def unauthenticated(self, index: int, event: StepSucceeded | StepFailed) -> str | None:
        """Why the reply ``event`` does not authenticate for step ``index``, or ``None``."""
        expected = self.steps[index].reply_token
        if expected is None:
            return None  # the command asked for no token (docs/protocol.md, upgrading)
        given = event.reply_token
        if given is None:
            return "reply rejected: it carries no reply token"
        # Constant time: the comparison must not tell a forger how much of a guess was right.
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
            return "reply rejected: its reply token is not the current attempt's"
        return None

    def last_attempt_timed_out(self, index: int) -> bool:
        error = self.steps[index].error
        return error is not None and error.code == TIMEOUT_CODE

    # ------------------------------------------------------------------ step outcomes

    def succeeded(self, index: int, data: Mapping[str, Any]) -> Decision:
        self.complete(index, data)
        return self.finish()

    def complete(self, index: int, data: Mapping[str, Any]) -> None:
        """The current step (or its compensation) succeeded with ``data``: move on."""
        step_def = self.definition.steps[index]
        if self.status is _COMPENSATING:  # self.kind is COMPENSATE, without the property call
            self.update_step(index, status=StepStatus.COMPENSATED, finished_at=self.at)
            self.emit(EventKind.STEP_COMPENSATED, step=step_def.name)
            self.next_compensation(index - 1)
            return
        merged = self.merge(step_def, dict(data))
        if isinstance(merged, ErrorInfo):
            # The participant did apply its effect: record it as applied, then compensate it too.
            self.update_step(
                index,
                status=StepStatus.SUCCEEDED,
                # An oversized reply is not kept anywhere: holding it is what the limit prevents.
                result=None if merged.code == DATA_TOO_LARGE_CODE else dict(data),
                error=merged,
                finished_at=self.at,
            )
            self.reason = merged.message
            self.emit(EventKind.STEP_FAILED, step=step_def.name, error=merged)
            self.error = merged
            self.begin_compensation()
            return
        self.data = merged
        self.update_step(
            index,
            status=_STEP_SUCCEEDED,
            result=dict(data),
            error=None,
            finished_at=self.at,
        )
        self.emit(_STEP_COMPLETED, step=step_def.name)
        self.begin_step(index + 1)

    # ------------------------------------------------------------------ bus events

    def event_received(self, event: EventReceived) -> Decision:
        """The event a wait step waits for: complete the step now, or keep it for later."""
        index = self.index_of(event.step)
        if index is None:
            return _ignored(self.before, event, f"unknown step {event.step!r}")
        if self.definition.steps[index].action.kind is not ActionKind.WAIT:
            return _ignored(self.before, event, f"step {event.step!r} does not wait for an event")
        if self.status is not SagaStatus.RUNNING:
            return _ignored(self.before, event, f"saga is {self.status.value}")
        state = self.steps[index]
        if index == self.current and self.wait is WaitKind.REPLY:
            self.reason = f"{event.event} arrived"
            return self.succeeded(index, event.data)
        if index > self.current and state.status is StepStatus.PENDING:
            if state.early_event is not None:
                return _ignored(
                    self.before, event, f"an earlier {event.event} is already kept for this step"
                )
            # Arrived before the saga got to the step: keep it; the step completes on arrival.
            self.update_step(index, early_event=dict(event.data))
            self.reason = f"{event.event} arrived early: kept until step {event.step!r} begins"
            return self.finish()
        return _ignored(self.before, event, f"step {event.step!r} is {state.status.value}")

    def cancelled(self, event: Cancel) -> Decision:
        """A cancelling event: a running saga compensates; any other ignores it."""
        if self.status is not SagaStatus.RUNNING:
            return _ignored(self.before, event, f"saga is {self.status.value}")
        self.error = ErrorInfo(
            code=CANCELLED_BY_EVENT_CODE,
            message=f"cancelled by {event.event}" + (f": {event.reason}" if event.reason else ""),
        )
        self.reason = self.error.message
        self.begin_compensation()
        return self.finish()

    def merge(self, step_def: StepDefinition, reply: dict[str, Any]) -> dict[str, Any] | ErrorInfo:
        try:
            if step_def.reply_model is not None:
                reply = step_def.reply_model.model_validate(reply).model_dump(mode="json")
            merged = step_def.merge(self.parsed_data(), reply)
            model = self.definition.parse_data(
                merged, saga_id=self.before.saga_id, step=step_def.name
            )
        except ValidationError as exc:
            return ErrorInfo(
                code=INVALID_REPLY_CODE,
                message=f"reply data does not fit: {describe_validation(exc)}",
            )
        except InvalidSagaData as exc:
            return ErrorInfo(code=INVALID_REPLY_CODE, message=exc.reason)
        except Exception as exc:  # noqa: BLE001 - a user merge function failed: fail the step
            return ErrorInfo(code=INVALID_REPLY_CODE, message=f"{type(exc).__name__}: {exc}")
        dumped = model.model_dump(mode="json")
        if self.max_data_bytes is not None:
            too_large = self.too_large(step_def.name, reply, dumped, self.max_data_bytes)
            if too_large is not None:
                return too_large
        self._parsed = (dumped, model)  # the caller stores exactly this dict as the data
        return dumped

    def too_large(
        self, step: str, reply: dict[str, Any], merged: dict[str, Any], limit: int
    ) -> ErrorInfo | None:
        """The error of a reply whose data, or the saga data it makes, is over ``limit`` bytes."""
        for what, value in (("the reply's data", reply), ("the saga data", merged)):
            size = len(pydantic_core.to_json(value))
            if size > limit:
                return ErrorInfo(
                    code=DATA_TOO_LARGE_CODE,
                    message=(
                        f"saga {self.before.saga_id} ({self.definition.name}), step {step!r}: "
                        f"{what} would take {size} bytes as JSON, over the saga data limit of "
                        f"{limit} bytes (SAGAS_MAX_SAGA_DATA_BYTES)"
                    ),
                )
        return None

    def timed_out(self, index: int) -> Decision:
        spec = self.spec(index, self.kind)
        try:
            timeout = spec.timeout_for(self.parsed_data)
        except Exception:  # noqa: BLE001 - it worked when the attempt began; only the text needs it
            timeout = None
        within = f"within {timeout.total_seconds():g}s" if timeout else "within its timeout"
        message = f"no reply to attempt {self.attempt} {within}"
        if spec.kind is ActionKind.WAIT:
            message = f"{spec.command_type} did not arrive {within}"
        error = ErrorInfo(code=TIMEOUT_CODE, message=message, retryable=True)
        if self.kind is _EXECUTE:
            self.update_step(index, status=StepStatus.TIMED_OUT, error=error)
        else:
            self.update_step(index, error=error)
        self.reason = error.message
        return self.failed(index, error)

    def failed(self, index: int, error: ErrorInfo) -> Decision:
        spec = self.spec(index, self.kind)
        step_name = self.definition.steps[index].name
        used = self.attempt - self.attempt_base
        # Whether the attempt timed out is a property of the input, not of the error code: a
        # participant may reply ``failed`` with code "timeout" (a downstream call timed out),
        # and that reply still means nothing was applied, so the step must not be compensated.
        timed_out = isinstance(self.event, Timeout)
        if self.kind is _EXECUTE and not timed_out:
            self.update_step(index, status=StepStatus.FAILED, error=error)
        elif self.kind is _COMPENSATE:
            self.update_step(index, error=error)
        if spec.retry.is_retryable(error) and used < spec.retry.attempts:
            delay = spec.retry.backoff.delay(used, f"{self.before.saga_id}:{step_name}")
            self.wait = WaitKind.RETRY
            self.deadline_at = self.at + delay
            self.emit(EventKind.STEP_RETRY_SCHEDULED, step=step_name, error=error)
            return self.finish()
        self.emit(EventKind.STEP_FAILED, step=step_name, error=error)
        if self.kind is _EXECUTE:
            if timed_out:
                self.update_step(index, finished_at=self.at)
            else:
                self.update_step(index, status=StepStatus.FAILED, finished_at=self.at)
            self.error = error
            self.begin_compensation()
        else:
            self.park(index, error)
        return self.finish()

    def saga_timeout(self, event: SagaTimeout) -> Decision:
        deadline = self.before.saga_deadline_at
        if self.status is not SagaStatus.RUNNING or deadline is None or event.at < deadline:
            return _ignored(self.before, event, "no saga deadline has passed")
        seconds = (
            self.definition.saga_timeout.total_seconds() if self.definition.saga_timeout else 0
        )
        self.error = ErrorInfo(
            code=SAGA_TIMEOUT_CODE, message=f"saga did not finish within {seconds:g}s"
        )
        self.reason = self.error.message
        self.emit(
            EventKind.STEP_FAILED,
            step=self.definition.steps[self.current].name,
            error=self.error,
        )
        self.begin_compensation()
        return self.finish()

    def failed_saga_input(
        self, event: StepSucceeded | StepFailed | Timeout | RetryDue, index: int
    ) -> Decision:
        # A late success of the very compensation attempt that timed out and parked the saga is
        # good news: take it and carry on compensating instead of waiting for a human.
        if (
            isinstance(event, StepSucceeded)
            and event.kind is _COMPENSATE
            and index == self.current
            and event.attempt == self.attempt
            and self.last_attempt_timed_out(index)
        ):
            refused = self.unauthenticated(index, event)
            if refused is not None:
                return _ignored(self.before, event, refused, outcome="rejected")
            self.status = SagaStatus.COMPENSATING
            self.error = None
            self.reason = "late reply to the last compensation attempt"
            return self.succeeded(index, event.data)
        return _ignored(self.before, event, "saga is failed: waiting for an operator")

    # ------------------------------------------------------------------ operator actions

    def operator(self, event: Compensate | RetryCompensation | Resolve) -> Decision:
        self.reason = event.reason or None
        if isinstance(event, Compensate):
            if self.status is not SagaStatus.RUNNING:
                raise self.not_allowed("compensate", "running")
            self.error = ErrorInfo(
                code=OPERATOR_CODE,
                message=f"compensation requested by {event.actor}"
                + (f": {event.reason}" if event.reason else ""),
            )
            self.emit(EventKind.OPERATOR_ACTION, detail=f"compensate by {event.actor}")
            self.begin_compensation()
            return self.finish()
        if self.status is not SagaStatus.FAILED:
            action = "retry" if isinstance(event, RetryCompensation) else "resolve"
            raise self.not_allowed(action, "failed")
        if isinstance(event, RetryCompensation):
            self.status = SagaStatus.COMPENSATING
            self.emit(EventKind.OPERATOR_ACTION, detail=f"retry compensation by {event.actor}")
            if self.steps[self.current].status in _COMPENSATION_STARTED:
                self.update_step(self.current, status=StepStatus.COMPENSATING, finished_at=None)
                self.send(self.current, _COMPENSATE, new_round=True)
            else:
                # Parked while going forward (its state could not be decided then): compensate
                # from the current step down, skipping what has nothing to undo.
                self.next_compensation(self.current)
            return self.finish()
        self.status = SagaStatus.RESOLVED
        self.wait = None
        self.deadline_at = None
        self.emit(EventKind.RESOLVED, detail=f"resolved by {event.actor}: {event.reason}")
        return self.finish()

    def not_allowed(self, action: str, allowed: str) -> InvalidOperation:
        return InvalidOperation(
            f"cannot {action} a {self.status.value} saga (only a {allowed} one)",
            saga_id=self.before.saga_id,
            saga_type=self.before.saga_type,
        )

    # ------------------------------------------------------------------ moving forward

    def begin_step(self, index: int) -> None:
        if index >= len(self.definition.steps):
            self.current = len(self.definition.steps) - 1
            self.status = _COMPLETED
            self.wait = None
            self.deadline_at = None
            self.emit(_SAGA_COMPLETED)
            return
        self.current = index
        self.send(index, _EXECUTE, new_round=True)

    def send(self, index: int, kind: StepKind, *, new_round: bool) -> None:
        """Send the next attempt of ``kind`` for step ``index``, or fail it if it can't be built."""
        step_def = self.definition.steps[index]
        spec = self.spec(index, kind)
        state = self.steps[index]
        made = state.attempts if kind is _EXECUTE else state.compensation_attempts
        if new_round:
            self.attempt_base = made
        if spec.kind is _WAIT_ACTION:
            self.wait_for_event(index, made + 1)
            return
        reopens = self.circuits.get(spec.destination)
        if reopens is not None and reopens > self.at:
            # The destination's circuit is open: wait for it without using an attempt.
            self.attempt = made
            self.wait = WaitKind.RETRY
            self.deadline_at = reopens
            self.reason = f"circuit of {spec.destination!r} is open until {reopens.isoformat()}"
            self.emit(EventKind.STEP_DEFERRED, step=step_def.name, detail=self.reason)
            return
        attempt = made + 1
        self.attempt = attempt
        if kind is _EXECUTE:
            self.update_step(
                index,
                status=_STEP_RUNNING,
                attempts=attempt,
                started_at=state.started_at or self.at,
                reply_token=self.reply_token,
            )
        else:
            self.update_step(
                index,
                status=StepStatus.COMPENSATING,
                compensation_attempts=attempt,
                reply_token=self.reply_token,
            )
        self.wait = _REPLY
        try:
            self.deadline_at = self.deadline(spec)
        except Exception as exc:  # noqa: BLE001 - a per-saga timeout failed: the step fails
            self.not_begun(index, kind, _timeout_error(step_def.name, exc))
            return
        try:
            payload = spec.build_payload(self.parsed_data())
        except Exception as exc:  # noqa: BLE001 - a mapper failed: the step fails, visibly
            message = (
                exc.reason if isinstance(exc, InvalidSagaData) else f"{type(exc).__name__}: {exc}"
            )
            if isinstance(exc, ValidationError):
                message = describe_validation(exc)
            error = ErrorInfo(
                code=INVALID_PAYLOAD_CODE,
                message=f"could not build {spec.command_type}: {message}",
            )
            self.not_begun(index, kind, error)
            return
        self.commands.append(
            self.command(step_def, spec, kind, attempt, payload, reply_token=self.reply_token)
        )

    def deadline(self, spec: ActionSpec) -> datetime | None:
        """When the attempt beginning now times out (a per-saga timeout reads the data)."""
        # The common case first: no call, no data parsed.
        timeout = spec.timeout if spec.timeout_of is None else spec.timeout_for(self.parsed_data)
        return None if timeout is None else self.at + timeout

    def not_begun(self, index: int, kind: StepKind, error: ErrorInfo) -> None:
        """The attempt could not begin (nothing was sent): fail the step with ``error``."""
        step_def = self.definition.steps[index]
        self.reason = error.message
        self.wait = None
        self.deadline_at = None
        if kind is _EXECUTE:
            # Nothing was sent, so nothing can have been applied.
            self.update_step(index, status=StepStatus.FAILED, error=error, finished_at=self.at)
            self.emit(EventKind.STEP_FAILED, step=step_def.name, error=error)
            self.error = error
            self.begin_compensation()
        else:
            self.emit(EventKind.STEP_FAILED, step=step_def.name, error=error)
            self.park(index, error)

    def wait_for_event(self, index: int, attempt: int) -> None:
        """Begin a step that waits for a bus event (no command); complete it if it came early."""
        state = self.steps[index]
        spec = self.spec(index, _EXECUTE)
        self.attempt = attempt
        self.update_step(
            index,
            status=StepStatus.RUNNING,
            attempts=attempt,
            started_at=state.started_at or self.at,
            early_event=None,
        )
        self.wait = WaitKind.REPLY
        try:
            self.deadline_at = self.deadline(spec)
        except Exception as exc:  # noqa: BLE001 - a per-saga timeout failed: the step fails
            self.not_begun(index, _EXECUTE, _timeout_error(self.definition.steps[index].name, exc))
            return
        if state.early_event is not None:
            self.complete(index, state.early_event)

    def command(
        self,
        step_def: StepDefinition,
        spec: ActionSpec,
        kind: StepKind,
        attempt: int,
        payload: dict[str, Any],
        *,
        reply_token: str | None = None,
    ) -> CommandMessage:
        saga_id = self.before.saga_id
        return trusted(
            CommandMessage,
            {
                "message_id": command_message_id(saga_id, step_def.name, kind, attempt),
                "saga_id": saga_id,
                "saga_type": self.definition.name,
                "step": step_def.name,
                "attempt": attempt,
                "kind": kind,
                "command_type": spec.command_type,
                "destination": spec.destination,
                "payload": payload,
                "idempotency_key": idempotency_key(saga_id, step_def.name, kind),
                "reply_to": None,
                "created_at": self.at,
                "headers": {},
                "reply_token": reply_token,
            },
        )

    def spec(self, index: int, kind: StepKind) -> ActionSpec:
        spec = self.definition.steps[index].spec(kind)
        if spec is None:  # pragma: no cover - the engine only compensates steps that can be
            raise InvalidOperation(
                "step has no compensation",
                saga_id=self.before.saga_id,
                saga_type=self.definition.name,
                step=self.definition.steps[index].name,
            )
        return spec

    # ------------------------------------------------------------------ compensation

    def begin_compensation(self) -> None:
        self.status = SagaStatus.COMPENSATING
        self.wait = None
        self.deadline_at = None
        self.emit(EventKind.COMPENSATING, error=self.error)
        self.next_compensation(len(self.steps) - 1)

    def next_compensation(self, start: int) -> None:
        for index in range(start, -1, -1):
            state = self.steps[index]
            if state.status not in _MAY_BE_APPLIED:
                continue
            if self.definition.steps[index].compensation is None:
                self.update_step(index, status=StepStatus.SKIPPED)
                continue
            self.current = index
            self.send(index, _COMPENSATE, new_round=True)
            return
        self.status = SagaStatus.COMPENSATED
        self.wait = None
        self.deadline_at = None
        self.emit(EventKind.COMPENSATED, error=self.error)

    def park(self, index: int, error: ErrorInfo) -> None:
        """Compensation ran out of attempts: park the saga and dead-letter the command."""
        step_def = self.definition.steps[index]
        spec = self.spec(index, _COMPENSATE)
        self.update_step(
            index, status=StepStatus.COMPENSATION_FAILED, error=error, finished_at=self.at
        )
        self.status = SagaStatus.FAILED
        self.wait = None
        self.deadline_at = None
        try:
            payload = spec.build_payload(self.parsed_data())
        except Exception:  # noqa: BLE001 - the dead letter still names what could not be built
            payload = {}
        command = self.command(step_def, spec, _COMPENSATE, self.attempt, payload)
        self.dead_letters.append(
            DeadLetterMessage(
                message_id=f"{command.message_id}:dead",
                command=command,
                error=error,
                reason=(
                    f"compensation of step {step_def.name!r} failed after "
                    f"{self.attempt - self.attempt_base} attempt(s): {error.code}"
                ),
                at=self.at,
            )
        )
        self.emit(EventKind.FAILED, step=step_def.name, error=error)

    # ------------------------------------------------------------------ bookkeeping

    def update_step(self, index: int, **changes: Any) -> None:
        self.steps[index] = replace(self.steps[index], changes)

    def emit(
        self,
        kind: EventKind,
        *,
        step: str | None = None,
        error: ErrorInfo | None = None,
        detail: str | None = None,
    ) -> None:
        attempt = self.attempt if step is not None and self.attempt > 0 else None
        self.pending_events.append(_PendingEvent(kind, self.status, step, error, detail, attempt))

    def finish(self) -> Decision:
        before = self.before
        version = before.version if self.created else before.version + 1
        status = self.status
        active = status in _ACTIVE
        at = self.at
        instance = replace(
            before,
            {
                "status": status,
                "current_step": self.current,
                "attempt": self.attempt,
                "attempt_base": self.attempt_base,
                "wait": self.wait if active else None,
                "deadline_at": self.deadline_at if active else None,
                "data": self.data,
                "steps": tuple(self.steps),
                "error": self.error,
                "version": version,
                "updated_at": at,
            },
        )
        saga_id, saga_type = before.saga_id, before.saga_type
        events = []
        for number, (kind, event_status, step, error, detail, attempt) in enumerate(
            self.pending_events
        ):
            events.append(
                trusted(
                    SagaEvent,
                    {
                        "event_id": f"{saga_id}:{version}:{number}",
                        "saga_id": saga_id,
                        "saga_type": saga_type,
                        "kind": kind,
                        "status": event_status,
                        "step": step,
                        "attempt": attempt,
                        "version": version,
                        "at": at,
                        "error": error,
                        "detail": detail,
                    },
                )
            )
        history = _history(
            before,
            self.event,
            version=version,
            outcome="applied",
            from_status=None if self.created else before.status,
            to_status=self.status,
            reason=self.reason,
        )
        return Decision(
            instance=instance,
            changed=True,
            commands=tuple(self.commands),
            events=tuple(events),
            dead_letters=tuple(self.dead_letters),
            history=(history,),
        )
