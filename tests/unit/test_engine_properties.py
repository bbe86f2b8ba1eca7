"""Property tests of the pure engine: random definitions, random input sequences, fixed rules.

A driver starts a saga of 1-5 random steps and feeds ``decide`` a random sequence of inputs:
replies to the current command (success, retryable or permanent failure), duplicates of earlier
inputs, late replies to superseded attempts, reply timeouts and retry deadlines (early, on time or
late), saga timeouts, operator actions and the passing of time. Then it drives the saga to its end
by answering every command with success and firing every deadline. Every decision on the way is
checked against the rules the engine promises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from hypothesis import event as statistic
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sagas_abstractions import (
    Cancel,
    CommandMessage,
    Compensate,
    ErrorInfo,
    EventKind,
    InvalidOperation,
    Resolve,
    RetryCompensation,
    RetryDue,
    SagaInput,
    SagaInstance,
    SagaStatus,
    SagaTimeout,
    Start,
    StepFailed,
    StepKind,
    StepStatus,
    StepSucceeded,
    Timeout,
    WaitKind,
)
from sagas_core.builder import SagaBuilder
from sagas_core.definition import SagaDefinition
from sagas_core.engine import Decision, decide, due_input
from sagas_core.retry import TIMEOUT_CODE, RetryPolicy, fixed

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SAGA_ID = "s-1"
MAX_RANDOM_INPUTS = 200
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


class Data(BaseModel):
    order_id: str
    counter: int = 0


class Do(BaseModel):
    order_id: str


class Undo(BaseModel):
    order_id: str
    counter: int = 0


# ---------------------------------------------------------------------------- random definitions


@dataclass(frozen=True)
class StepShape:
    compensable: bool
    attempts: int
    timeout: float | None
    compensation_attempts: int


@dataclass(frozen=True)
class SagaShape:
    steps: tuple[StepShape, ...]
    saga_timeout: float | None

    def build(self) -> SagaDefinition:
        builder = SagaBuilder("prop", data=Data)
        for index, shape in enumerate(self.steps):
            step = builder.step(f"step{index}").send(Do, to=f"service{index}")
            step.retry(shape.attempts, backoff=fixed(1 + index))
            if shape.timeout is not None:
                step.timeout(seconds=shape.timeout)
            if shape.compensable:
                step.compensate_with(
                    Undo, retry=RetryPolicy(shape.compensation_attempts, backoff=fixed(0.5))
                )
        if self.saga_timeout is not None:
            builder.saga_timeout(seconds=self.saga_timeout)
        return builder.build()


step_shapes = st.builds(
    StepShape,
    compensable=st.booleans(),
    attempts=st.integers(1, 3),
    timeout=st.none() | st.sampled_from([5.0, 10.0]),
    compensation_attempts=st.integers(1, 3),
)
saga_shapes = st.builds(
    SagaShape,
    steps=st.lists(step_shapes, min_size=1, max_size=5).map(tuple),
    saga_timeout=st.none() | st.sampled_from([20.0, 90.0]),
)


class Op(StrEnum):
    SUCCEED = "succeed"
    FAIL_RETRYABLE = "fail_retryable"
    FAIL_PERMANENT = "fail_permanent"
    DUPLICATE = "duplicate"
    OLD_REPLY = "old_reply"
    TIMEOUT = "timeout"
    RETRY_DUE = "retry_due"
    SAGA_TIMEOUT = "saga_timeout"
    ADVANCE = "advance"
    DUE = "due"
    OPERATOR_COMPENSATE = "operator_compensate"
    RETRY_COMPENSATION = "retry_compensation"
    CANCEL_EVENT = "cancel_event"


# Weighted so that sagas get far enough to compensate, park and be retried.
WEIGHTS = {
    Op.SUCCEED: 6,
    Op.FAIL_RETRYABLE: 3,
    Op.FAIL_PERMANENT: 2,
    Op.DUPLICATE: 2,
    Op.OLD_REPLY: 2,
    Op.TIMEOUT: 2,
    Op.RETRY_DUE: 2,
    Op.SAGA_TIMEOUT: 1,
    Op.ADVANCE: 1,
    Op.DUE: 3,
    Op.OPERATOR_COMPENSATE: 1,
    Op.RETRY_COMPENSATION: 1,
    Op.CANCEL_EVENT: 1,
}
_operation = st.tuples(
    st.sampled_from([op for op, weight in WEIGHTS.items() for _ in range(weight)]),
    st.integers(0, 2**16),
)
# Short runs shrink well; long ones reach the deep corners (several rounds of retries).
operations = st.lists(_operation, max_size=30) | st.lists(
    _operation, min_size=60, max_size=MAX_RANDOM_INPUTS
)


# ---------------------------------------------------------------------------- the driver


def _is_operator(event: SagaInput) -> bool:
    return isinstance(event, Compensate | RetryCompensation | Resolve)


class Driver:
    """Feeds inputs to one saga and checks every decision against the engine's rules."""

    def __init__(self, definition: SagaDefinition) -> None:
        self.definition = definition
        self.index = {step.name: step.index for step in definition.steps}
        self.instance: SagaInstance | None = None
        self.now = T0
        self.inputs: list[tuple[SagaInput, bool]] = []
        self.commands: list[CommandMessage] = []
        self.message_ids: set[str] = set()
        self.dead_letter_ids: set[str] = set()
        # What the participants told us about each step's execute attempts.
        self.last_execute_attempt: dict[str, int] = {}
        self.outcome: dict[tuple[str, int], str] = {}
        self.compensated: set[str] = set()
        self.compensation_order: list[int] = []
        self.step_compensated_events: Counter[str] = Counter()
        self.endings: list[EventKind] = []

    # -- state --------------------------------------------------------------------------------

    @property
    def saga(self) -> SagaInstance:
        assert self.instance is not None
        return self.instance

    @property
    def last(self) -> CommandMessage:
        return self.commands[-1]

    def may_be_applied(self, step: str) -> bool:
        """Per the participants' replies: the step's last attempt did not reply ``failed``."""
        attempt = self.last_execute_attempt.get(step)
        return attempt is not None and self.outcome.get((step, attempt)) != "failed"

    # -- feeding ------------------------------------------------------------------------------

    def feed(self, event: SagaInput) -> Decision | None:
        before = self.instance
        try:
            decision = decide(self.definition, before, event)
        except InvalidOperation:
            assert _is_operator(event), "only operator actions may be refused"
            assert before is not None
            return None
        self.check(before, event, decision)
        self.instance = decision.instance
        self.inputs.append((event, decision.changed))
        self.check_same_input_again(event, decision.instance)
        return decision

    def check_same_input_again(self, event: SagaInput, instance: SagaInstance) -> None:
        try:
            again = decide(self.definition, instance, event)
        except InvalidOperation:
            assert _is_operator(event)
            return
        assert not again.changed, f"{type(event).__name__} applied twice in a row"
        assert again.instance is instance

    def check(self, before: SagaInstance | None, event: SagaInput, decision: Decision) -> None:
        after = decision.instance
        assert len(decision.history) == 1
        row = decision.history[0]
        if decision.changed:
            assert after.version == (1 if before is None else before.version + 1)
            assert row.outcome == "applied"
        else:
            assert before is not None
            assert after is before
            assert (decision.commands, decision.events, decision.dead_letters) == ((), (), ())
            assert row.outcome in {"stale", "duplicate"}
            assert row.version == before.version
            return
        assert before is None or not before.status.is_terminal, "a terminal saga changed"
        if isinstance(event, Timeout | RetryDue):
            assert before is not None
            assert before.deadline_at is not None
            assert event.at >= before.deadline_at, "a deadline fired early"
        if isinstance(event, SagaTimeout):
            assert before is not None
            assert before.saga_deadline_at is not None
            assert event.at >= before.saga_deadline_at, "the saga deadline fired early"
        self.learn(event)
        for command in decision.commands:
            self.check_command(command)
        self.check_events_and_dead_letters(before, decision)
        if after.status.is_active:
            assert after.wait is not None
            assert self.last.step == after.current_step_name
            assert self.last.attempt == after.attempt
            assert self.last.kind is after.current_kind
            if after.wait is WaitKind.RETRY:
                assert after.deadline_at is not None
                assert after.deadline_at >= event.at
        else:
            assert (after.wait, after.deadline_at, after.next_deadline_at) == (None, None, None)

    def learn(self, event: SagaInput) -> None:
        """Record what an applied input told us, before judging what the engine did about it."""
        if not isinstance(event, StepSucceeded | StepFailed | Timeout):
            return
        if event.kind is StepKind.EXECUTE:
            outcome = {StepSucceeded: "succeeded", StepFailed: "failed", Timeout: "timed_out"}
            self.outcome[event.step, event.attempt] = outcome[type(event)]
        elif isinstance(event, StepSucceeded):
            assert event.step not in self.compensated, "a step was compensated twice"
            self.compensated.add(event.step)

    def check_command(self, command: CommandMessage) -> None:
        assert command.saga_id == SAGA_ID
        assert command.message_id not in self.message_ids, "a message id was reused"
        self.message_ids.add(command.message_id)
        assert command.message_id == (
            f"{SAGA_ID}:{command.step}:{command.kind.value}:{command.attempt}"
        )
        self.commands.append(command)
        step = command.step
        if command.kind is StepKind.EXECUTE:
            assert not self.compensation_order, "an execute command after compensation began"
            assert command.attempt == self.last_execute_attempt.get(step, 0) + 1
            self.last_execute_attempt[step] = command.attempt
            return
        index = self.index[step]
        assert self.definition.steps[index].compensation is not None
        assert step in self.last_execute_attempt, f"compensating {step}, which never started"
        assert self.may_be_applied(step), f"compensating {step}, whose last attempt failed"
        assert step not in self.compensated, f"compensating {step} again"
        if self.compensation_order:
            assert index <= self.compensation_order[-1], "compensation out of reverse order"
        self.compensation_order.append(index)

    def check_events_and_dead_letters(
        self, before: SagaInstance | None, decision: Decision
    ) -> None:
        after = decision.instance
        for event in decision.events:
            assert event.version == after.version
            if event.kind is EventKind.STEP_COMPENSATED:
                assert event.step is not None
                self.step_compensated_events[event.step] += 1
                assert self.step_compensated_events[event.step] == 1
            if event.kind in {EventKind.COMPLETED, EventKind.COMPENSATED}:
                self.endings.append(event.kind)
                assert len(self.endings) == 1, "a saga ended twice"
        parked = after.status is SagaStatus.FAILED and (
            before is None or before.status is not SagaStatus.FAILED
        )
        if parked:
            assert len(decision.dead_letters) == 1
            assert decision.events[-1].kind is EventKind.FAILED
            assert not decision.commands
        else:
            assert not decision.dead_letters
        for dead in decision.dead_letters:
            assert dead.message_id not in self.dead_letter_ids
            self.dead_letter_ids.add(dead.message_id)
            assert dead.command.kind is StepKind.COMPENSATE

    # -- inputs -------------------------------------------------------------------------------

    def reply(self, command: CommandMessage, op: Op, param: int) -> SagaInput:
        common: dict[str, Any] = {
            "step": command.step,
            "attempt": command.attempt,
            "kind": command.kind,
            "at": self.now,
            "message_id": f"{command.message_id}:reply:{param}",
        }
        if op is Op.SUCCEED:
            # Now and then, reply data that does not fit the saga data (the effect is applied).
            data: dict[str, Any] = {"counter": "lots" if param % 11 == 0 else param % 100}
            return StepSucceeded(**common, data=data)
        # Participants may report code "timeout" too: a failed reply all the same.
        code = TIMEOUT_CODE if param % 5 == 0 else "declined"
        error = ErrorInfo(code=code, message="no", retryable=op is Op.FAIL_RETRYABLE)
        return StepFailed(**common, error=error)

    def moment(self, deadline: datetime | None, param: int) -> datetime:
        """Now (possibly before ``deadline``), or on/after ``deadline``; time only moves on."""
        if deadline is not None and param % 3 != 0:
            self.now = max(self.now, deadline + timedelta(seconds=param % 2))
        return self.now

    def apply(self, op: Op, param: int) -> None:
        saga, last = self.saga, self.last
        if op in {Op.SUCCEED, Op.FAIL_RETRYABLE, Op.FAIL_PERMANENT}:
            self.feed(self.reply(last, op, param))
            return
        if op is Op.OLD_REPLY:
            replies = (Op.SUCCEED, Op.FAIL_RETRYABLE, Op.FAIL_PERMANENT)
            old = self.commands[param % len(self.commands)]
            self.feed(self.reply(old, replies[param // 7 % 3], param))
            return
        if op is Op.DUPLICATE:
            previous, applied = self.inputs[param % len(self.inputs)]
            if _is_operator(previous):
                return
            decision = self.feed(previous)
            assert decision is not None
            if applied:
                assert not decision.changed, "a duplicate of an applied input was applied"
            return
        if op in {Op.TIMEOUT, Op.RETRY_DUE}:
            when = self.moment(saga.deadline_at, param)
            kind = Timeout if op is Op.TIMEOUT else RetryDue
            self.feed(kind(step=last.step, attempt=last.attempt, kind=last.kind, at=when))
            return
        if op is Op.SAGA_TIMEOUT:
            self.feed(SagaTimeout(at=self.moment(saga.saga_deadline_at, param)))
            return
        if op is Op.ADVANCE:
            self.now += timedelta(seconds=param % 20)
            return
        if op is Op.DUE:
            self.moment(saga.next_deadline_at, 1)
            due = due_input(saga, self.now)
            if due is not None:
                decision = self.feed(due)
                assert decision is not None
                assert decision.changed, "a due deadline did nothing"
            return
        if op is Op.OPERATOR_COMPENSATE:
            self.feed(Compensate(at=self.now, actor="op", reason="property test"))
            return
        if op is Op.CANCEL_EVENT:
            # A cancelling bus event: compensates a running saga, ignored by any other.
            self.feed(Cancel(event="Cancelled", at=self.now, message_id=f"event-{param}"))
            return
        self.feed(RetryCompensation(at=self.now, actor="op"))

    def drive_to_the_end(self) -> None:
        """Answer every command with success and fire every deadline until the saga rests."""
        for _ in range(100):
            saga = self.saga
            if not saga.status.is_active:
                return
            last = self.last
            if saga.wait is WaitKind.REPLY:
                event: SagaInput = StepSucceeded(
                    step=last.step, attempt=last.attempt, kind=last.kind, at=self.now
                )
            else:
                assert saga.deadline_at is not None
                self.now = max(self.now, saga.deadline_at)
                event = RetryDue(step=last.step, attempt=last.attempt, kind=last.kind, at=self.now)
            decision = self.feed(event)
            assert decision is not None
            assert decision.changed
        raise AssertionError("the saga did not come to rest")


# ---------------------------------------------------------------------------- properties


def run_saga(shape: SagaShape, ops: list[tuple[Op, int]]) -> Driver:
    driver = Driver(shape.build())
    start = driver.feed(Start(saga_id=SAGA_ID, data={"order_id": "o-1"}, at=T0))
    assert start is not None
    assert start.changed
    for op, param in ops:
        driver.apply(op, param)
    driver.drive_to_the_end()
    return driver


@PROPERTY_SETTINGS
@given(shape=saga_shapes, ops=operations)
def test_every_saga_comes_to_rest_completed_compensated_or_failed(
    shape: SagaShape, ops: list[tuple[Op, int]]
) -> None:
    driver = run_saga(shape, ops)
    saga = driver.saga
    statistic(f"ended {saga.status.value}")
    statistic(f"{'some' if driver.compensation_order else 'no'} compensation")
    statistic(f"{'some' if driver.dead_letter_ids else 'no'} dead letter")
    statistic(
        f"{sum(isinstance(i, RetryCompensation) for i, _ in driver.inputs)} compensation retries"
    )

    assert saga.status in {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED}
    if saga.status is SagaStatus.COMPLETED:
        assert driver.endings == [EventKind.COMPLETED]
        assert not driver.compensation_order
        assert all(step.status is StepStatus.SUCCEEDED for step in saga.steps)
    elif saga.status is SagaStatus.COMPENSATED:
        assert driver.endings == [EventKind.COMPENSATED]
    else:
        assert driver.endings == []
        assert driver.dead_letter_ids


@PROPERTY_SETTINGS
@given(shape=saga_shapes, ops=operations)
def test_a_compensated_saga_undid_exactly_the_steps_that_may_have_applied(
    shape: SagaShape, ops: list[tuple[Op, int]]
) -> None:
    driver = run_saga(shape, ops)
    saga = driver.saga

    if saga.status is not SagaStatus.COMPENSATED:
        return
    for step_def, state in zip(driver.definition.steps, saga.steps, strict=True):
        if not driver.may_be_applied(step_def.name):
            assert step_def.name not in driver.compensated
            assert state.status in {StepStatus.PENDING, StepStatus.FAILED}
        elif step_def.compensation is None:
            assert state.status is StepStatus.SKIPPED
        else:
            assert step_def.name in driver.compensated
            assert state.status is StepStatus.COMPENSATED
    assert driver.compensation_order == sorted(driver.compensation_order, reverse=True)


@PROPERTY_SETTINGS
@given(shape=saga_shapes, ops=operations)
def test_nothing_moves_a_saga_once_it_is_terminal(
    shape: SagaShape, ops: list[tuple[Op, int]]
) -> None:
    driver = run_saga(shape, ops)
    saga = driver.saga
    if not saga.status.is_terminal:
        return
    sent = len(driver.commands)

    # Replay every input seen, plus deadlines far in the future: none may change the saga.
    far = driver.now + timedelta(days=1)
    for event, _ in list(driver.inputs):
        if _is_operator(event):
            assert driver.feed(event) is None  # refused: InvalidOperation
            continue
        decision = driver.feed(event)
        assert decision is not None
        assert not decision.changed
    for command in driver.commands[:]:
        for late in (
            StepSucceeded(step=command.step, attempt=command.attempt, kind=command.kind, at=far),
            Timeout(step=command.step, attempt=command.attempt, kind=command.kind, at=far),
            RetryDue(step=command.step, attempt=command.attempt, kind=command.kind, at=far),
        ):
            decision = driver.feed(late)
            assert decision is not None
            assert not decision.changed
    assert driver.feed(SagaTimeout(at=far)) is not None
    assert due_input(saga, far) is None
    assert len(driver.commands) == sent
    assert driver.saga is saga


@PROPERTY_SETTINGS
@given(shape=saga_shapes, ops=operations)
def test_the_same_inputs_always_give_the_same_decisions(
    shape: SagaShape, ops: list[tuple[Op, int]]
) -> None:
    first = run_saga(shape, ops)
    second = run_saga(shape, ops)

    assert first.saga == second.saga
    assert [c.message_id for c in first.commands] == [c.message_id for c in second.commands]
