"""Every transition of the pure engine, ``decide(definition, instance, input)``.

Times are fixed, timezone-aware UTC datetimes: the engine never reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    Compensate,
    ErrorInfo,
    EventKind,
    InvalidOperation,
    InvalidSagaData,
    Resolve,
    RetryCompensation,
    RetryDue,
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
from sagas_core.builder import SagaBuilder
from sagas_core.definition import SagaDefinition
from sagas_core.engine import (
    INVALID_PAYLOAD_CODE,
    INVALID_REPLY_CODE,
    OPERATOR_CODE,
    SAGA_TIMEOUT_CODE,
    Decision,
    command_message_id,
    decide,
    due_input,
    idempotency_key,
    parked,
)
from sagas_core.retry import TIMEOUT_CODE, RetryPolicy, exponential, fixed

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SAGA_ID = "s-1"
EXECUTE = StepKind.EXECUTE
COMPENSATE = StepKind.COMPENSATE


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---------------------------------------------------------------------------- the saga under test


class OrderData(BaseModel):
    order_id: str
    amount: int = 0
    reservation_id: str | None = None
    payment_id: str | None = None


class ReserveInventory(BaseModel):
    order_id: str


class ReleaseInventory(BaseModel):
    order_id: str
    reservation_id: str | None = None


class ProcessPayment(BaseModel):
    order_id: str
    amount: int


class RefundPayment(BaseModel):
    order_id: str
    payment_id: str | None = None


class CreateShipment(BaseModel):
    order_id: str


class AuditOrder(BaseModel):
    order_id: str


class Reserved(BaseModel):
    reservation_id: str


DATA = {"order_id": "o-1", "amount": 30}
STEP_TIMEOUT = 10
SAGA_TIMEOUT = 60
RESERVE_BACKOFF = 2
REFUND_BACKOFF = 1


def order_saga(
    *,
    saga_timeout: float | None = SAGA_TIMEOUT,
    step_timeout: float | None = STEP_TIMEOUT,
    pay_map: Callable[[OrderData], Mapping[str, Any]] | None = None,
    refund_map: Callable[[OrderData], Mapping[str, Any]] | None = None,
    reserve_reply: type[BaseModel] | None = None,
    reserve_merge: Callable[[OrderData, Mapping[str, Any]], Mapping[str, Any]] | None = None,
    retry_on_timeout: bool = True,
) -> SagaDefinition:
    """reserve (3 attempts) -> pay (2 attempts, refund 2 attempts) -> ship (no compensation)."""
    reserve = (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory", reply=reserve_reply)
        .compensate_with(ReleaseInventory)
        .retry(3, backoff=fixed(RESERVE_BACKOFF), retry_on_timeout=retry_on_timeout)
    )
    if reserve_merge is not None:
        reserve = reserve.merge(reserve_merge)
    pay = (
        reserve.step("pay")
        .send(ProcessPayment, to="payments", map=pay_map)
        .compensate_with(
            RefundPayment, map=refund_map, retry=RetryPolicy(2, backoff=fixed(REFUND_BACKOFF))
        )
        .retry(2, backoff=fixed(1))
    )
    ship = reserve.step("ship").send(CreateShipment, to="shipping")
    if step_timeout is not None:
        for step in (reserve, pay, ship):
            step.timeout(seconds=step_timeout)
    if saga_timeout is not None:
        ship.saga_timeout(seconds=saga_timeout)
    return ship.build()


def gap_saga() -> SagaDefinition:
    """reserve (compensable) -> audit (nothing to undo) -> pay (compensable)."""
    return (
        SagaBuilder("gap", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory)
        .step("audit")
        .send(AuditOrder, to="audit")
        .step("pay")
        .send(ProcessPayment, to="payments")
        .compensate_with(RefundPayment)
        .build()
    )


ORDER = order_saga()


# ---------------------------------------------------------------------------- driving helpers


class Run:
    """Feeds inputs to ``decide`` and checks the rules every single decision obeys."""

    def __init__(self, definition: SagaDefinition = ORDER) -> None:
        self.definition = definition
        self._instance: SagaInstance | None = None
        self.commands: list[CommandMessage] = []

    @property
    def instance(self) -> SagaInstance:
        assert self._instance is not None
        return self._instance

    @property
    def last(self) -> CommandMessage:
        return self.commands[-1]

    def feed(self, event: SagaInput) -> Decision:
        before = self._instance
        decision = decide(self.definition, before, event)
        assert len(decision.history) == 1
        row = decision.history[0]
        assert row.input == type(event).__name__
        assert row.at == event.at
        if decision.changed:
            expected = 1 if before is None else before.version + 1
            assert decision.instance.version == expected
            assert row.outcome == "applied"
            assert row.version == expected
            assert row.to_status is decision.instance.status
            assert row.from_status is (None if before is None else before.status)
            assert decision.instance.updated_at == event.at
            assert all(e.version == expected for e in decision.events)
        else:
            assert decision.instance is before
            assert not decision.commands
            assert not decision.events
            assert not decision.dead_letters
            assert row.outcome in {"stale", "duplicate"}
            assert before is not None
            assert row.from_status is row.to_status is before.status
            assert row.version == before.version
        if not decision.instance.status.is_active:
            assert decision.instance.wait is None
            assert decision.instance.deadline_at is None
        self._instance = decision.instance
        self.commands.extend(decision.commands)
        return decision

    def start(self, when: datetime = T0, data: Mapping[str, Any] = DATA) -> Decision:
        return self.feed(Start(saga_id=SAGA_ID, data=dict(data), at=when))

    def succeed(self, when: datetime, **data: Any) -> Decision:
        return self.feed(
            StepSucceeded(
                step=self.last.step,
                attempt=self.last.attempt,
                kind=self.last.kind,
                at=when,
                data=data,
            )
        )

    def fail(self, when: datetime, code: str = "declined", *, retryable: bool = False) -> Decision:
        error = ErrorInfo(code=code, message=f"{code}!", retryable=retryable)
        return self.feed(
            StepFailed(
                step=self.last.step,
                attempt=self.last.attempt,
                kind=self.last.kind,
                at=when,
                error=error,
            )
        )

    def time_out(self, when: datetime) -> Decision:
        return self.feed(
            Timeout(step=self.last.step, attempt=self.last.attempt, kind=self.last.kind, at=when)
        )

    def retry_due(self, when: datetime) -> Decision:
        return self.feed(
            RetryDue(step=self.last.step, attempt=self.last.attempt, kind=self.last.kind, at=when)
        )

    def step(self, name: str) -> StepState:
        return next(s for s in self.instance.steps if s.name == name)


def kinds(decision: Decision) -> list[EventKind]:
    return [event.kind for event in decision.events]


def ids(decision: Decision) -> list[str]:
    return [command.message_id for command in decision.commands]


def statuses(run: Run) -> dict[str, StepStatus]:
    return {step.name: step.status for step in run.instance.steps}


def compensating_pay(definition: SagaDefinition = ORDER) -> Run:
    """reserve and pay succeeded, ship failed for good: the refund of pay is out (attempt 1)."""
    run = Run(definition)
    run.start()
    run.succeed(at(1), reservation_id="r-1")
    run.succeed(at(2), payment_id="p-1")
    run.fail(at(3))
    assert run.instance.status is SagaStatus.COMPENSATING
    assert run.last.message_id == "s-1:pay:compensate:1"
    return run


def failed_saga() -> Run:
    """The refund of pay failed twice (its policy allows 2 attempts): the saga is parked."""
    run = compensating_pay()
    run.fail(at(4), "gateway_down", retryable=True)
    run.retry_due(at(4 + REFUND_BACKOFF))
    run.fail(at(6), "gateway_down", retryable=True)
    assert run.instance.status is SagaStatus.FAILED
    return run


# ---------------------------------------------------------------------------- start


def test_start_creates_a_running_saga_at_step_zero_attempt_one() -> None:
    decision = Run().start()
    saga = decision.instance

    assert decision.changed
    assert saga.saga_id == SAGA_ID
    assert saga.saga_type == "order"
    assert saga.status is SagaStatus.RUNNING
    assert (saga.current_step, saga.attempt, saga.attempt_base) == (0, 1, 0)
    assert saga.version == 1
    assert saga.data == {**DATA, "reservation_id": None, "payment_id": None}
    assert saga.created_at == saga.updated_at == T0
    assert saga.error is None
    assert [(s.name, s.status, s.attempts) for s in saga.steps] == [
        ("reserve", StepStatus.RUNNING, 1),
        ("pay", StepStatus.PENDING, 0),
        ("ship", StepStatus.PENDING, 0),
    ]
    assert saga.steps[0].started_at == T0


def test_start_sends_the_first_command_with_a_deterministic_id_and_idempotency_key() -> None:
    decision = Run().start()

    assert len(decision.commands) == 1
    command = decision.commands[0]
    assert command.message_id == "s-1:reserve:execute:1"
    assert command.message_id == command_message_id(SAGA_ID, "reserve", EXECUTE, 1)
    assert command.idempotency_key == "s-1:reserve" == idempotency_key(SAGA_ID, "reserve", EXECUTE)
    assert (command.saga_id, command.saga_type, command.step) == (SAGA_ID, "order", "reserve")
    assert (command.attempt, command.kind) == (1, EXECUTE)
    assert (command.command_type, command.destination) == ("ReserveInventory", "inventory")
    assert command.payload == {"order_id": "o-1"}
    assert command.created_at == T0


def test_start_is_deterministic() -> None:
    first = decide(ORDER, None, Start(saga_id=SAGA_ID, data=DATA, at=T0))
    second = decide(ORDER, None, Start(saga_id=SAGA_ID, data=DATA, at=T0))

    assert first == second


def test_start_sets_the_reply_deadline_and_the_saga_deadline_from_the_timeouts() -> None:
    saga = Run().start(at(5)).instance

    assert saga.wait is WaitKind.REPLY
    assert saga.deadline_at == at(5 + STEP_TIMEOUT)
    assert saga.saga_deadline_at == at(5 + SAGA_TIMEOUT)
    assert saga.next_deadline_at == at(5 + STEP_TIMEOUT)


def test_start_without_timeouts_sets_no_deadline() -> None:
    saga = Run(order_saga(saga_timeout=None, step_timeout=None)).start().instance

    assert saga.wait is WaitKind.REPLY
    assert saga.deadline_at is None
    assert saga.saga_deadline_at is None
    assert saga.next_deadline_at is None


def test_start_emits_a_started_event_and_writes_a_history_row() -> None:
    decision = Run().start()

    assert kinds(decision) == [EventKind.STARTED]
    event = decision.events[0]
    assert event.event_id == "s-1:1:0"
    assert (event.saga_type, event.status, event.version, event.at) == (
        "order",
        SagaStatus.RUNNING,
        1,
        T0,
    )
    (row,) = decision.history
    assert (row.saga_id, row.version, row.input, row.outcome) == (SAGA_ID, 1, "Start", "applied")
    assert (row.from_status, row.to_status) == (None, SagaStatus.RUNNING)


def test_start_records_fingerprint_correlation_id_and_trace_context() -> None:
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    event = Start(saga_id=SAGA_ID, data=DATA, at=T0, correlation_id="order-1", trace_context=trace)

    saga = decide(ORDER, None, event).instance

    assert saga.definition_version == ORDER.fingerprint
    assert saga.correlation_id == "order-1"
    assert saga.trace_context == trace


def test_start_with_data_that_does_not_fit_the_model_raises_invalid_saga_data() -> None:
    with pytest.raises(InvalidSagaData, match="order_id") as caught:
        decide(ORDER, None, Start(saga_id=SAGA_ID, data={"amount": "lots"}, at=T0))

    assert (caught.value.saga_id, caught.value.saga_type) == (SAGA_ID, "order")
    assert {str(e["loc"]) for e in caught.value.errors} == {"('order_id',)", "('amount',)"}


def test_duplicate_start_changes_nothing() -> None:
    run = Run()
    run.start()
    before = run.instance

    decision = run.feed(Start(saga_id=SAGA_ID, data={"order_id": "other"}, at=at(1)))

    assert not decision.changed
    assert decision.instance is before
    assert decision.history[0].outcome == "duplicate"


def test_an_input_for_a_saga_that_does_not_exist_raises_saga_not_found() -> None:
    with pytest.raises(SagaNotFound):
        decide(ORDER, None, SagaTimeout(at=T0))


def test_an_input_for_another_saga_type_raises_unknown_saga_type() -> None:
    saga = Run(gap_saga()).start().instance

    with pytest.raises(UnknownSagaType, match="'gap' saga, not 'order'"):
        decide(ORDER, saga, SagaTimeout(at=at(1000)))


# ---------------------------------------------------------------------------- success


def test_success_moves_to_the_next_step_and_merges_reply_data() -> None:
    run = Run()
    run.start()

    decision = run.succeed(at(1), reservation_id="r-1", unrelated="ignored")
    saga = decision.instance

    assert saga.status is SagaStatus.RUNNING
    assert (saga.current_step, saga.attempt, saga.attempt_base) == (1, 1, 0)
    assert saga.data["reservation_id"] == "r-1"
    assert "unrelated" not in saga.data
    assert ids(decision) == ["s-1:pay:execute:1"]
    assert decision.commands[0].payload == {"order_id": "o-1", "amount": 30}
    assert saga.deadline_at == at(1 + STEP_TIMEOUT)
    reserve = saga.steps[0]
    assert reserve.status is StepStatus.SUCCEEDED
    assert reserve.result == {"reservation_id": "r-1", "unrelated": "ignored"}
    assert reserve.finished_at == at(1)
    assert reserve.error is None
    assert kinds(decision) == [EventKind.STEP_COMPLETED]
    assert decision.events[0].step == "reserve"


def test_merged_data_reaches_the_payload_of_later_commands() -> None:
    run = Run()
    run.start()
    run.succeed(at(1), reservation_id="r-1")
    run.succeed(at(2), payment_id="p-1")
    run.fail(at(3))

    # The refund is built from data merged by the pay step's reply.
    assert run.last.payload == {"order_id": "o-1", "payment_id": "p-1"}


def test_success_of_the_last_step_completes_the_saga() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.succeed(at(2))

    decision = run.succeed(at(3), amount=31)
    saga = decision.instance

    assert saga.status is SagaStatus.COMPLETED
    assert saga.status.is_terminal
    assert saga.current_step == 2
    assert saga.data["amount"] == 31
    assert (saga.wait, saga.deadline_at, saga.next_deadline_at) == (None, None, None)
    assert not decision.commands
    assert kinds(decision) == [EventKind.STEP_COMPLETED, EventKind.COMPLETED]
    assert all(s.status is StepStatus.SUCCEEDED for s in saga.steps)
    assert due_input(saga, at(10_000)) is None


def test_success_through_a_reply_model_merges_its_fields() -> None:
    run = Run(order_saga(reserve_reply=Reserved))
    run.start()

    decision = run.succeed(at(1), reservation_id="r-1")

    assert decision.instance.data["reservation_id"] == "r-1"
    assert decision.instance.current_step == 1


def test_a_merge_function_controls_what_enters_the_saga_data() -> None:
    run = Run(order_saga(reserve_merge=lambda d, r: {**d.model_dump(), "amount": r["total"]}))
    run.start()

    decision = run.succeed(at(1), total=99)

    assert decision.instance.data["amount"] == 99


# ---------------------------------------------------------------------------- permanent failure


def test_permanent_failure_compensates_completed_steps_in_reverse_order_not_the_failed_one() -> (
    None
):
    run = Run()
    run.start()
    run.succeed(at(1), reservation_id="r-1")
    run.succeed(at(2), payment_id="p-1")

    failing = run.fail(at(3), "no_carrier")

    assert failing.instance.status is SagaStatus.COMPENSATING
    assert failing.instance.error == ErrorInfo(code="no_carrier", message="no_carrier!")
    assert kinds(failing) == [EventKind.STEP_FAILED, EventKind.COMPENSATING]
    assert ids(failing) == ["s-1:pay:compensate:1"]
    refund = failing.commands[0]
    assert (refund.kind, refund.command_type, refund.destination) == (
        COMPENSATE,
        "RefundPayment",
        "payments",
    )
    assert refund.idempotency_key == "s-1:pay:compensate"
    assert statuses(run) == {
        "reserve": StepStatus.SUCCEEDED,
        "pay": StepStatus.COMPENSATING,
        "ship": StepStatus.FAILED,
    }
    assert run.step("ship").finished_at == at(3)

    refunded = run.succeed(at(4))

    assert ids(refunded) == ["s-1:reserve:compensate:1"]
    assert refunded.commands[0].payload == {"order_id": "o-1", "reservation_id": "r-1"}
    assert kinds(refunded) == [EventKind.STEP_COMPENSATED]
    assert refunded.instance.current_step == 0

    released = run.succeed(at(5))

    assert released.instance.status is SagaStatus.COMPENSATED
    assert not released.commands
    assert kinds(released) == [EventKind.STEP_COMPENSATED, EventKind.COMPENSATED]
    assert statuses(run) == {
        "reserve": StepStatus.COMPENSATED,
        "pay": StepStatus.COMPENSATED,
        "ship": StepStatus.FAILED,
    }
    assert [c.step for c in run.commands if c.kind is COMPENSATE] == ["pay", "reserve"]


def test_permanent_failure_of_the_first_step_compensates_nothing() -> None:
    run = Run()
    run.start()

    decision = run.fail(at(1))

    assert decision.instance.status is SagaStatus.COMPENSATED
    assert not decision.commands
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.COMPENSATING, EventKind.COMPENSATED]
    assert run.step("reserve").status is StepStatus.FAILED


def test_a_retryable_error_code_listed_as_never_retry_compensates_at_once() -> None:
    definition = (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .retry(3, never_retry_codes=("fraud",), retry_codes=("busy",))
        .build()
    )
    run = Run(definition)
    run.start()

    assert run.fail(at(1), "busy", retryable=False).instance.wait is WaitKind.RETRY
    run.retry_due(at(100))
    assert run.fail(at(101), "fraud", retryable=True).instance.status is SagaStatus.COMPENSATED


# ---------------------------------------------------------------------------- retries


def test_retryable_failure_schedules_a_retry_after_the_backoff() -> None:
    run = Run()
    run.start()

    decision = run.fail(at(1), "busy", retryable=True)
    saga = decision.instance

    assert saga.status is SagaStatus.RUNNING
    assert saga.wait is WaitKind.RETRY
    assert saga.deadline_at == at(1 + RESERVE_BACKOFF)
    assert saga.attempt == 1
    assert not decision.commands
    assert kinds(decision) == [EventKind.STEP_RETRY_SCHEDULED]
    assert run.step("reserve").status is StepStatus.FAILED
    assert run.step("reserve").error == ErrorInfo(code="busy", message="busy!", retryable=True)
    assert due_input(saga, at(1 + RESERVE_BACKOFF)) == RetryDue(
        step="reserve", attempt=1, kind=EXECUTE, at=at(1 + RESERVE_BACKOFF)
    )


def test_retry_due_resends_attempt_two_with_a_new_message_id_and_the_same_idempotency_key() -> None:
    run = Run()
    first = run.start().commands[0]
    run.fail(at(1), "busy", retryable=True)

    decision = run.retry_due(at(1 + RESERVE_BACKOFF))
    saga = decision.instance

    (second,) = decision.commands
    assert second.message_id == "s-1:reserve:execute:2"
    assert second.message_id != first.message_id
    assert second.idempotency_key == first.idempotency_key
    assert second.payload == first.payload
    assert (saga.attempt, saga.attempt_base) == (2, 0)
    assert saga.wait is WaitKind.REPLY
    assert saga.deadline_at == at(1 + RESERVE_BACKOFF + STEP_TIMEOUT)
    assert run.step("reserve").status is StepStatus.RUNNING
    assert run.step("reserve").attempts == 2
    assert run.step("reserve").started_at == T0


def test_retry_due_before_its_deadline_is_stale() -> None:
    run = Run()
    run.start()
    run.fail(at(1), "busy", retryable=True)

    decision = run.retry_due(at(1 + RESERVE_BACKOFF - 0.001))

    assert not decision.changed
    assert decision.history[0].outcome == "stale"


def test_retry_due_while_waiting_for_a_reply_is_stale() -> None:
    run = Run()
    run.start()

    assert not run.retry_due(at(1000)).changed


def test_success_of_a_retried_attempt_moves_on() -> None:
    run = Run()
    run.start()
    run.fail(at(1), "busy", retryable=True)
    run.retry_due(at(3))

    decision = run.succeed(at(4), reservation_id="r-2")

    assert decision.instance.current_step == 1
    assert run.step("reserve").status is StepStatus.SUCCEEDED
    assert run.step("reserve").attempts == 2


def test_exponential_backoff_gives_a_deterministic_deadline_per_saga() -> None:
    backoff = exponential(1, max=30)
    definition = (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .retry(3, backoff=backoff)
        .build()
    )
    run = Run(definition)
    run.start()

    first = run.fail(at(1), "busy", retryable=True).instance.deadline_at
    run.retry_due(at(100))
    second = run.fail(at(101), "busy", retryable=True).instance.deadline_at

    assert first == at(1) + backoff.delay(1, "s-1:reserve")
    assert second == at(101) + backoff.delay(2, "s-1:reserve")
    replay = Run(definition)
    replay.start()
    assert replay.fail(at(1), "busy", retryable=True).instance.deadline_at == first


def test_exhausted_attempts_compensate_the_completed_steps() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.fail(at(2), "busy", retryable=True)
    run.retry_due(at(3))

    decision = run.fail(at(4), "busy", retryable=True)

    assert decision.instance.status is SagaStatus.COMPENSATING
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.COMPENSATING]
    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert run.step("pay").status is StepStatus.FAILED
    assert run.step("pay").attempts == 2


def test_a_failed_reply_with_the_timeout_code_is_a_failure_not_an_uncertain_outcome() -> None:
    # A participant may legitimately report code "timeout" (a downstream call timed out); its
    # reply still says "failed", so nothing was applied and the step must not be compensated.
    run = Run()
    run.start()
    run.succeed(at(1))

    decision = run.fail(at(2), TIMEOUT_CODE)
    assert run.step("pay").status is StepStatus.FAILED
    assert run.step("pay").error == ErrorInfo(code=TIMEOUT_CODE, message="timeout!")
    if decision.instance.wait is WaitKind.RETRY:  # the retry policy may retry the code
        run.retry_due(at(3))
        decision = run.fail(at(4), TIMEOUT_CODE)

    assert run.step("pay").status is StepStatus.FAILED
    assert ids(decision) == ["s-1:reserve:compensate:1"]


# ---------------------------------------------------------------------------- reply timeouts


def test_timeout_before_the_deadline_is_stale() -> None:
    run = Run()
    run.start()

    decision = run.time_out(at(STEP_TIMEOUT - 0.001))

    assert not decision.changed
    assert decision.history[0].outcome == "stale"
    assert decision.history[0].reason == "no reply deadline has passed"


def test_timeout_of_a_step_without_timeout_is_stale() -> None:
    run = Run(order_saga(step_timeout=None))
    run.start()

    assert not run.time_out(at(10_000)).changed


def test_timeout_at_the_deadline_schedules_a_retry_and_marks_the_step_timed_out() -> None:
    run = Run()
    run.start()
    assert due_input(run.instance, at(STEP_TIMEOUT)) == Timeout(
        step="reserve", attempt=1, kind=EXECUTE, at=at(STEP_TIMEOUT)
    )

    decision = run.time_out(at(STEP_TIMEOUT))
    saga = decision.instance

    assert saga.wait is WaitKind.RETRY
    assert saga.deadline_at == at(STEP_TIMEOUT + RESERVE_BACKOFF)
    assert kinds(decision) == [EventKind.STEP_RETRY_SCHEDULED]
    reserve = run.step("reserve")
    assert reserve.status is StepStatus.TIMED_OUT
    assert reserve.error is not None
    assert (reserve.error.code, reserve.error.retryable) == (TIMEOUT_CODE, True)
    assert reserve.error.message == "no reply to attempt 1 within 10s"


def test_timeout_of_the_last_attempt_compensates_the_timed_out_step_too() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.time_out(at(1 + STEP_TIMEOUT))
    run.retry_due(at(12))

    decision = run.time_out(at(12 + STEP_TIMEOUT))

    # The payment may have been taken: refund it, then release the stock.
    assert decision.instance.status is SagaStatus.COMPENSATING
    assert decision.instance.error is not None
    assert decision.instance.error.code == TIMEOUT_CODE
    assert ids(decision) == ["s-1:pay:compensate:1"]
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.COMPENSATING]
    assert run.step("pay").finished_at == at(12 + STEP_TIMEOUT)
    assert ids(run.succeed(at(30))) == ["s-1:reserve:compensate:1"]
    assert run.succeed(at(31)).instance.status is SagaStatus.COMPENSATED
    assert statuses(run)["pay"] is StepStatus.COMPENSATED


def test_timeout_is_not_retried_when_the_policy_says_so() -> None:
    run = Run(order_saga(retry_on_timeout=False))
    run.start()

    decision = run.time_out(at(STEP_TIMEOUT))

    # Reserve is the first step but timed out: its effect may be applied, so it is released.
    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert run.step("reserve").status is StepStatus.COMPENSATING


def test_late_success_of_the_timed_out_attempt_while_waiting_for_retry_is_accepted() -> None:
    run = Run()
    run.start()
    run.time_out(at(STEP_TIMEOUT))

    decision = run.succeed(at(STEP_TIMEOUT + 1), reservation_id="r-late")

    assert decision.changed
    assert decision.instance.current_step == 1
    assert decision.instance.data["reservation_id"] == "r-late"
    assert ids(decision) == ["s-1:pay:execute:1"]
    reserve = run.step("reserve")
    assert (reserve.status, reserve.error, reserve.attempts) == (StepStatus.SUCCEEDED, None, 1)


def test_late_failure_of_the_timed_out_attempt_while_waiting_for_retry_is_stale() -> None:
    run = Run()
    run.start()
    run.time_out(at(STEP_TIMEOUT))

    decision = run.fail(at(STEP_TIMEOUT + 1))

    assert not decision.changed
    assert decision.history[0].reason == "attempt already failed"


def test_success_for_an_attempt_that_already_failed_is_stale() -> None:
    run = Run()
    run.start()
    run.fail(at(1), "busy", retryable=True)

    decision = run.succeed(at(1.5))

    assert not decision.changed
    assert decision.history[0].reason == "attempt already failed"


def test_a_second_timeout_of_the_same_attempt_is_stale() -> None:
    run = Run()
    run.start()
    run.time_out(at(STEP_TIMEOUT))

    assert not run.time_out(at(STEP_TIMEOUT + 1)).changed


# ---------------------------------------------------------------------------- stale inputs


def _at_pay_attempt_two() -> Run:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.fail(at(2), "busy", retryable=True)
    run.retry_due(at(3))
    return run


StaleCase = tuple[Callable[[], Run], Callable[[], SagaInput]]

STALE_CASES: dict[str, StaleCase] = {
    "success of an old attempt": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="pay", attempt=1, kind=EXECUTE, at=at(5)),
    ),
    "failure of an old attempt": (
        _at_pay_attempt_two,
        lambda: StepFailed(
            step="pay", attempt=1, kind=EXECUTE, at=at(5), error=ErrorInfo(code="x")
        ),
    ),
    "timeout of an old attempt": (
        _at_pay_attempt_two,
        lambda: Timeout(step="pay", attempt=1, kind=EXECUTE, at=at(500)),
    ),
    "reply from a future attempt": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="pay", attempt=3, kind=EXECUTE, at=at(5)),
    ),
    "duplicate success of a finished step": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="reserve", attempt=1, kind=EXECUTE, at=at(5)),
    ),
    "reply for a step not started yet": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="ship", attempt=1, kind=EXECUTE, at=at(5)),
    ),
    "reply for an unknown step": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="gift-wrap", attempt=2, kind=EXECUTE, at=at(5)),
    ),
    "compensation reply while running forward": (
        _at_pay_attempt_two,
        lambda: StepSucceeded(step="pay", attempt=2, kind=COMPENSATE, at=at(5)),
    ),
    "execution reply while compensating": (
        compensating_pay,
        lambda: StepSucceeded(step="pay", attempt=1, kind=EXECUTE, at=at(5)),
    ),
    "execution timeout while compensating": (
        compensating_pay,
        lambda: Timeout(step="ship", attempt=1, kind=EXECUTE, at=at(500)),
    ),
    "saga timeout while compensating": (compensating_pay, lambda: SagaTimeout(at=at(500))),
    "reply to a completed saga": (
        lambda: _finished(SagaStatus.COMPLETED),
        lambda: StepSucceeded(step="ship", attempt=1, kind=EXECUTE, at=at(50)),
    ),
    "timeout of a completed saga": (
        lambda: _finished(SagaStatus.COMPLETED),
        lambda: Timeout(step="ship", attempt=1, kind=EXECUTE, at=at(500)),
    ),
    "reply to a compensated saga": (
        lambda: _finished(SagaStatus.COMPENSATED),
        lambda: StepSucceeded(step="reserve", attempt=1, kind=COMPENSATE, at=at(50)),
    ),
    "saga timeout of a compensated saga": (
        lambda: _finished(SagaStatus.COMPENSATED),
        lambda: SagaTimeout(at=at(500)),
    ),
}


def _finished(status: SagaStatus) -> Run:
    run = Run()
    run.start()
    if status is SagaStatus.COMPLETED:
        for second in (1, 2, 3):
            run.succeed(at(second))
    else:
        run.succeed(at(1))
        run.fail(at(2))
        run.succeed(at(3))
    assert run.instance.status is status
    return run


@pytest.mark.parametrize("case", list(STALE_CASES), ids=list(STALE_CASES))
def test_a_stale_input_changes_nothing_and_is_recorded_as_stale(case: str) -> None:
    make_run, make_input = STALE_CASES[case]
    run = make_run()
    before = run.instance
    event = make_input()

    decision = run.feed(event)

    assert not decision.changed
    assert decision.instance is before
    assert (decision.commands, decision.events, decision.dead_letters) == ((), (), ())
    (row,) = decision.history
    assert row.outcome == "stale"
    assert row.version == before.version
    assert row.from_status is row.to_status is before.status
    assert row.reason
    if isinstance(event, StepSucceeded | StepFailed | Timeout | RetryDue):
        assert (row.step, row.attempt, row.kind) == (event.step, event.attempt, event.kind)


def test_a_stale_reply_keeps_its_message_id_in_history() -> None:
    run = _at_pay_attempt_two()

    decision = run.feed(
        StepSucceeded(step="pay", attempt=1, kind=EXECUTE, at=at(5), message_id="reply-77")
    )

    assert decision.history[0].message_id == "reply-77"


# ---------------------------------------------------------------------------- saga timeout


def test_saga_timeout_before_the_saga_deadline_is_stale() -> None:
    run = Run()
    run.start()

    decision = run.feed(SagaTimeout(at=at(SAGA_TIMEOUT - 0.001)))

    assert not decision.changed
    assert decision.history[0].outcome == "stale"


def test_saga_timeout_of_a_saga_without_saga_timeout_is_stale() -> None:
    run = Run(order_saga(saga_timeout=None))
    run.start()

    assert not run.feed(SagaTimeout(at=at(10_000))).changed


def test_saga_timeout_compensates_from_the_current_step_in_flight_included() -> None:
    run = Run(order_saga(step_timeout=None))
    run.start()
    run.succeed(at(1))
    assert due_input(run.instance, at(SAGA_TIMEOUT)) == SagaTimeout(at=at(SAGA_TIMEOUT))

    decision = run.feed(SagaTimeout(at=at(SAGA_TIMEOUT)))
    saga = decision.instance

    assert saga.status is SagaStatus.COMPENSATING
    assert saga.error is not None
    assert saga.error.code == SAGA_TIMEOUT_CODE
    assert saga.error.message == "saga did not finish within 60s"
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.COMPENSATING]
    assert decision.events[0].step == "pay"
    # The payment is in flight: it may be taken, so it is refunded first.
    assert ids(decision) == ["s-1:pay:compensate:1"]
    # ... and its late execution reply is stale now.
    assert not run.feed(StepSucceeded(step="pay", attempt=1, kind=EXECUTE, at=at(61))).changed
    # The saga-level deadline no longer counts while compensating.
    assert saga.next_deadline_at is None
    assert due_input(saga, at(10_000)) is None


def test_saga_timeout_while_waiting_to_retry_a_failed_step_does_not_compensate_it() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.fail(at(2), "busy", retryable=True)

    decision = run.feed(SagaTimeout(at=at(SAGA_TIMEOUT)))

    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert run.step("pay").status is StepStatus.FAILED


def test_saga_timeout_while_waiting_to_retry_a_timed_out_step_compensates_it() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.time_out(at(1 + STEP_TIMEOUT))

    decision = run.feed(SagaTimeout(at=at(SAGA_TIMEOUT)))

    assert ids(decision) == ["s-1:pay:compensate:1"]


def test_due_input_prefers_the_earlier_of_step_and_saga_deadlines() -> None:
    run = Run(order_saga(saga_timeout=5))
    saga = run.start().instance

    assert due_input(saga, at(4)) is None
    assert due_input(saga, at(20)) == SagaTimeout(at=at(20))


# ---------------------------------------------------------------------------- compensation failure


def test_compensation_failure_is_retried_per_the_compensation_policy() -> None:
    run = compensating_pay()

    decision = run.fail(at(4), "gateway_down", retryable=True)

    assert decision.instance.status is SagaStatus.COMPENSATING
    assert decision.instance.wait is WaitKind.RETRY
    assert decision.instance.deadline_at == at(4 + REFUND_BACKOFF)
    assert kinds(decision) == [EventKind.STEP_RETRY_SCHEDULED]
    assert due_input(decision.instance, at(5)) == RetryDue(
        step="pay", attempt=1, kind=COMPENSATE, at=at(5)
    )

    resent = run.retry_due(at(4 + REFUND_BACKOFF))

    assert ids(resent) == ["s-1:pay:compensate:2"]
    assert resent.commands[0].idempotency_key == "s-1:pay:compensate"
    assert run.step("pay").compensation_attempts == 2


def test_compensation_that_runs_out_of_attempts_parks_the_saga_with_one_dead_letter() -> None:
    run = compensating_pay()
    run.fail(at(4), "gateway_down", retryable=True)
    run.retry_due(at(5))

    decision = run.fail(at(6), "gateway_down", retryable=True)
    saga = decision.instance

    assert saga.status is SagaStatus.FAILED
    assert not saga.status.is_terminal
    assert not saga.status.is_active
    assert (saga.wait, saga.deadline_at, saga.next_deadline_at) == (None, None, None)
    assert not decision.commands
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.FAILED]
    assert decision.events[-1].step == "pay"
    (dead,) = decision.dead_letters
    assert dead.message_id == "s-1:pay:compensate:2:dead"
    assert dead.command.message_id == "s-1:pay:compensate:2"
    assert (dead.command.kind, dead.command.command_type) == (COMPENSATE, "RefundPayment")
    assert dead.error.code == "gateway_down"
    assert dead.reason == "compensation of step 'pay' failed after 2 attempt(s): gateway_down"
    assert dead.at == at(6)
    pay = run.step("pay")
    assert pay.status is StepStatus.COMPENSATION_FAILED
    assert pay.error == dead.error
    # Reserve was never compensated: the saga stopped at the failing compensation.
    assert run.step("reserve").status is StepStatus.SUCCEEDED


def test_permanent_compensation_failure_parks_the_saga_at_once() -> None:
    run = compensating_pay()

    decision = run.fail(at(4), "refund_rejected")

    assert decision.instance.status is SagaStatus.FAILED
    assert [d.message_id for d in decision.dead_letters] == ["s-1:pay:compensate:1:dead"]


def test_a_failed_saga_ignores_replies_and_deadlines_until_an_operator_acts() -> None:
    run = failed_saga()

    for event in (
        StepSucceeded(step="pay", attempt=2, kind=COMPENSATE, at=at(7)),
        StepFailed(step="pay", attempt=2, kind=COMPENSATE, at=at(7), error=ErrorInfo(code="x")),
        Timeout(step="pay", attempt=2, kind=COMPENSATE, at=at(700)),
        RetryDue(step="pay", attempt=2, kind=COMPENSATE, at=at(700)),
        SagaTimeout(at=at(700)),
    ):
        decision = run.feed(event)
        assert not decision.changed
        assert decision.history[0].outcome == "stale"


def test_compensation_timeout_at_the_last_attempt_parks_and_a_late_success_resumes() -> None:
    run = compensating_pay()
    run.time_out(at(3 + STEP_TIMEOUT))
    run.retry_due(at(14))
    parked = run.time_out(at(14 + STEP_TIMEOUT))
    assert parked.instance.status is SagaStatus.FAILED
    assert [d.error.code for d in parked.dead_letters] == [TIMEOUT_CODE]

    decision = run.succeed(at(30))

    assert decision.instance.status is SagaStatus.COMPENSATING
    assert decision.instance.error is None
    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert run.step("pay").status is StepStatus.COMPENSATED
    assert run.succeed(at(31)).instance.status is SagaStatus.COMPENSATED


def test_late_success_of_a_timed_out_compensation_while_waiting_for_retry_is_accepted() -> None:
    run = compensating_pay()
    run.time_out(at(3 + STEP_TIMEOUT))

    decision = run.succeed(at(14))

    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert run.step("pay").status is StepStatus.COMPENSATED


# ---------------------------------------------------------------------------- operator actions


def test_operator_compensate_of_a_running_saga_compensates_the_in_flight_step() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))

    decision = run.feed(Compensate(at=at(2), actor="alice", reason="customer cancelled"))
    saga = decision.instance

    assert saga.status is SagaStatus.COMPENSATING
    assert saga.error == ErrorInfo(
        code=OPERATOR_CODE, message="compensation requested by alice: customer cancelled"
    )
    assert kinds(decision) == [EventKind.OPERATOR_ACTION, EventKind.COMPENSATING]
    assert ids(decision) == ["s-1:pay:compensate:1"]
    row = decision.history[0]
    assert (row.actor, row.reason, row.input) == ("alice", "customer cancelled", "Compensate")


def test_operator_compensate_without_a_reason_names_the_actor() -> None:
    run = Run()
    run.start()

    decision = run.feed(Compensate(at=at(2), actor="alice"))

    assert decision.instance.error == ErrorInfo(
        code=OPERATOR_CODE, message="compensation requested by alice"
    )


def test_retry_compensation_continues_attempt_numbering_so_message_ids_are_never_reused() -> None:
    run = failed_saga()

    retried = run.feed(RetryCompensation(at=at(100), actor="bob", reason="gateway back"))
    saga = retried.instance

    assert saga.status is SagaStatus.COMPENSATING
    assert (saga.attempt, saga.attempt_base) == (3, 2)
    assert saga.wait is WaitKind.REPLY
    assert saga.deadline_at == at(100 + STEP_TIMEOUT)
    assert ids(retried) == ["s-1:pay:compensate:3"]
    assert kinds(retried) == [EventKind.OPERATOR_ACTION]
    assert run.step("pay").status is StepStatus.COMPENSATING

    # A new round gets the policy's full attempts again.
    assert run.fail(at(101), "gateway_down", retryable=True).instance.wait is WaitKind.RETRY
    run.retry_due(at(102))
    parked = run.fail(at(103), "gateway_down", retryable=True)

    assert parked.instance.status is SagaStatus.FAILED
    assert [d.message_id for d in parked.dead_letters] == ["s-1:pay:compensate:4:dead"]
    assert "after 2 attempt(s)" in parked.dead_letters[0].reason
    message_ids = [c.message_id for c in run.commands]
    assert len(message_ids) == len(set(message_ids))


def test_retry_compensation_that_succeeds_finishes_the_compensation() -> None:
    run = failed_saga()
    run.feed(RetryCompensation(at=at(100), actor="bob"))

    refunded = run.succeed(at(101))
    released = run.succeed(at(102))

    assert ids(refunded) == ["s-1:reserve:compensate:1"]
    assert released.instance.status is SagaStatus.COMPENSATED


def test_resolve_closes_a_failed_saga_for_good() -> None:
    run = failed_saga()

    decision = run.feed(Resolve(at=at(100), actor="carol", reason="refunded by hand"))

    assert decision.instance.status is SagaStatus.RESOLVED
    assert decision.instance.status.is_terminal
    assert not decision.commands
    assert kinds(decision) == [EventKind.RESOLVED]
    assert decision.events[0].detail == "resolved by carol: refunded by hand"
    assert not run.feed(StepSucceeded(step="pay", attempt=2, kind=COMPENSATE, at=at(101))).changed


OPERATOR_ALLOWED: dict[type[Compensate | RetryCompensation | Resolve], SagaStatus] = {
    Compensate: SagaStatus.RUNNING,
    RetryCompensation: SagaStatus.FAILED,
    Resolve: SagaStatus.FAILED,
}


# ---------------------------------------------------------------------------- skipped steps


def test_steps_without_compensation_are_skipped() -> None:
    run = Run(gap_saga())
    run.start()
    run.succeed(at(1))
    run.succeed(at(2))

    decision = run.fail(at(3))

    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert statuses(run) == {
        "reserve": StepStatus.COMPENSATING,
        "audit": StepStatus.SKIPPED,
        "pay": StepStatus.FAILED,
    }
    assert run.succeed(at(4)).instance.status is SagaStatus.COMPENSATED
    assert statuses(run)["audit"] is StepStatus.SKIPPED


def test_operator_compensate_skips_an_in_flight_step_without_compensation() -> None:
    run = Run()
    run.start()
    run.succeed(at(1))
    run.succeed(at(2))

    decision = run.feed(Compensate(at=at(3), actor="alice"))

    # ship is in flight but has nothing to undo: skipped; pay is refunded first.
    assert ids(decision) == ["s-1:pay:compensate:1"]
    assert run.step("ship").status is StepStatus.SKIPPED


# ---------------------------------------------------------------------- bad replies and payloads


def test_reply_data_that_does_not_fit_the_data_model_fails_the_step_and_compensates_it() -> None:
    run = Run()
    run.start()

    decision = run.succeed(at(1), reservation_id=123)
    saga = decision.instance

    assert saga.status is SagaStatus.COMPENSATING
    assert saga.error is not None
    assert saga.error.code == INVALID_REPLY_CODE
    assert "reservation_id" in saga.error.message
    assert saga.data["reservation_id"] is None
    assert kinds(decision) == [EventKind.STEP_FAILED, EventKind.COMPENSATING]
    # The participant did apply its effect, so its step is compensated as well.
    assert ids(decision) == ["s-1:reserve:compensate:1"]
    reserve = run.step("reserve")
    assert reserve.result == {"reservation_id": 123}
    assert reserve.error == saga.error


def test_reply_data_that_does_not_fit_the_reply_model_fails_with_invalid_reply() -> None:
    run = Run(order_saga(reserve_reply=Reserved))
    run.start()

    decision = run.succeed(at(1), something_else="x")

    assert decision.instance.error is not None
    assert decision.instance.error.code == INVALID_REPLY_CODE
    assert decision.instance.error.message.startswith("reply data does not fit: reservation_id")
    assert ids(decision) == ["s-1:reserve:compensate:1"]


def test_a_merge_function_that_raises_fails_the_step_with_invalid_reply() -> None:
    run = Run(order_saga(reserve_merge=lambda d, r: {**d.model_dump(), "amount": r["missing"]}))
    run.start()

    decision = run.succeed(at(1))

    assert decision.instance.error == ErrorInfo(
        code=INVALID_REPLY_CODE, message="KeyError: 'missing'"
    )
    assert ids(decision) == ["s-1:reserve:compensate:1"]


def _explode(data: OrderData) -> Mapping[str, Any]:
    raise ValueError(f"cannot charge {data.order_id}")


def test_a_mapper_that_raises_fails_the_step_with_invalid_command_payload() -> None:
    run = Run(order_saga(pay_map=_explode))
    run.start()

    decision = run.succeed(at(1))
    saga = decision.instance

    expected = ErrorInfo(
        code=INVALID_PAYLOAD_CODE,
        message="could not build ProcessPayment: ValueError: cannot charge o-1",
    )
    assert saga.error == expected
    assert run.step("pay").status is StepStatus.FAILED
    assert run.step("pay").error == expected
    # Nothing was sent for pay, so only reserve is compensated.
    assert ids(decision) == ["s-1:reserve:compensate:1"]
    assert kinds(decision) == [
        EventKind.STEP_COMPLETED,
        EventKind.STEP_FAILED,
        EventKind.COMPENSATING,
    ]


def test_a_payload_that_does_not_fit_the_command_fails_with_invalid_command_payload() -> None:
    run = Run(order_saga(pay_map=lambda d: {"order_id": d.order_id, "amount": "a lot"}))
    run.start()

    decision = run.succeed(at(1))

    assert decision.instance.error is not None
    assert decision.instance.error.code == INVALID_PAYLOAD_CODE
    assert decision.instance.error.message.startswith("could not build ProcessPayment: amount")


def test_a_compensation_mapper_that_raises_parks_the_saga() -> None:
    run = Run(order_saga(refund_map=_explode))
    run.start()
    run.succeed(at(1))
    run.succeed(at(2))

    decision = run.fail(at(3))

    assert decision.instance.status is SagaStatus.FAILED
    assert not decision.commands
    (dead,) = decision.dead_letters
    assert dead.error.code == INVALID_PAYLOAD_CODE
    assert dead.command.payload == {}
    assert dead.message_id == "s-1:pay:compensate:1:dead"
    assert kinds(decision)[-1] is EventKind.FAILED


def test_the_first_step_mapper_that_raises_compensates_at_once_on_start() -> None:
    definition = (
        SagaBuilder("order", data=OrderData)
        .step("pay")
        .send(ProcessPayment, to="payments", map=_explode)
        .build()
    )

    decision = Run(definition).start()

    assert decision.instance.status is SagaStatus.COMPENSATED
    assert not decision.commands
    assert kinds(decision) == [
        EventKind.STARTED,
        EventKind.STEP_FAILED,
        EventKind.COMPENSATING,
        EventKind.COMPENSATED,
    ]


# ---------------------------------------------------------------------------- every status x input


def _running_waiting_for_retry() -> Run:
    run = Run()
    run.start()
    run.fail(at(1), "busy", retryable=True)
    return run


def _compensating_waiting_for_retry() -> Run:
    run = compensating_pay()
    run.fail(at(4), "gateway_down", retryable=True)
    return run


def _resolved() -> Run:
    run = failed_saga()
    run.feed(Resolve(at=at(50), actor="carol"))
    return run


def _running() -> Run:
    run = Run()
    run.start()
    run.succeed(at(1))
    return run


STATES: dict[str, Callable[[], Run]] = {
    "running, waiting for a reply": _running,
    "running, waiting to retry": _running_waiting_for_retry,
    "compensating, waiting for a reply": compensating_pay,
    "compensating, waiting to retry": _compensating_waiting_for_retry,
    "completed": lambda: _finished(SagaStatus.COMPLETED),
    "compensated": lambda: _finished(SagaStatus.COMPENSATED),
    "failed": failed_saga,
    "resolved": _resolved,
}

FAR = at(100_000)
INPUTS: dict[str, Callable[[CommandMessage], SagaInput]] = {
    "start": lambda _c: Start(saga_id=SAGA_ID, data=DATA, at=FAR),
    "success": lambda c: StepSucceeded(step=c.step, attempt=c.attempt, kind=c.kind, at=FAR),
    "permanent failure": lambda c: StepFailed(
        step=c.step, attempt=c.attempt, kind=c.kind, at=FAR, error=ErrorInfo(code="no")
    ),
    "retryable failure": lambda c: StepFailed(
        step=c.step,
        attempt=c.attempt,
        kind=c.kind,
        at=FAR,
        error=ErrorInfo(code="busy", retryable=True),
    ),
    "timeout": lambda c: Timeout(step=c.step, attempt=c.attempt, kind=c.kind, at=FAR),
    "retry due": lambda c: RetryDue(step=c.step, attempt=c.attempt, kind=c.kind, at=FAR),
    "stale attempt": lambda c: StepSucceeded(
        step=c.step, attempt=c.attempt + 1, kind=c.kind, at=FAR
    ),
    "other kind": lambda c: StepSucceeded(
        step=c.step, attempt=c.attempt, kind=COMPENSATE if c.kind is EXECUTE else EXECUTE, at=FAR
    ),
    "unknown step": lambda c: StepSucceeded(step="nope", attempt=1, kind=c.kind, at=FAR),
    "saga timeout": lambda _c: SagaTimeout(at=FAR),
    "compensate": lambda _c: Compensate(at=FAR, actor="op"),
    "retry compensation": lambda _c: RetryCompensation(at=FAR, actor="op"),
    "resolve": lambda _c: Resolve(at=FAR, actor="op"),
}


@pytest.mark.parametrize("input_name", list(INPUTS))
@pytest.mark.parametrize("state_name", list(STATES))
def test_every_status_and_input_combination_is_defined(state_name: str, input_name: str) -> None:
    run = STATES[state_name]()
    before = run.instance
    event = INPUTS[input_name](run.last)

    if (
        isinstance(event, Compensate | RetryCompensation | Resolve)
        and OPERATOR_ALLOWED[type(event)] is not before.status
    ):
        with pytest.raises(InvalidOperation) as caught:
            decide(run.definition, before, event)
        assert caught.value.saga_id == SAGA_ID
        assert caught.value.saga_type == "order"
        assert f"a {before.status.value} saga" in str(caught.value)
        return

    decision = run.feed(event)  # checks the version and history rules

    after = decision.instance
    if before.status.is_terminal or isinstance(event, Start):
        assert not decision.changed
    if after.status.is_terminal or after.status is SagaStatus.FAILED:
        assert not decision.commands
    if after.status.is_active:
        assert after.wait is not None
        assert decision.changed or after is before
    if decision.changed and after.status is not before.status:
        assert decision.events, "a status change is always announced"
    sent = {c.message_id for c in run.commands}
    assert len(sent) == len(run.commands), "message ids are never reused"


def test_the_every_status_table_covers_every_status() -> None:
    covered = {make().instance.status for make in STATES.values()}

    assert covered == set(SagaStatus)


def test_retrying_a_saga_parked_while_going_forward_compensates_from_its_current_step() -> None:
    # Parked at "ship" (no compensation) because its state could not be decided then: a retry
    # must undo pay and reserve, not crash on ship's missing compensation.
    run = Run()
    run.start()
    run.succeed(at(1), reservation_id="r-1")
    run.succeed(at(2), payment_id="p-1")
    assert run.instance.current_step_name == "ship"
    parked_now = parked(
        run.instance,
        error=ErrorInfo(code="definition_changed", message="changed"),
        at=at(3),
        reason="parked",
    )
    run._instance = parked_now.instance

    decision = run.feed(RetryCompensation(at=at(4), actor="ops"))

    assert decision.instance.status is SagaStatus.COMPENSATING
    assert [c.message_id for c in decision.commands] == ["s-1:pay:compensate:1"]
    assert statuses(run)["ship"] is StepStatus.SKIPPED
    run.succeed(at(5))
    run.succeed(at(6))
    assert run.instance.status is SagaStatus.COMPENSATED
    assert statuses(run) == {
        "reserve": StepStatus.COMPENSATED,
        "pay": StepStatus.COMPENSATED,
        "ship": StepStatus.SKIPPED,
    }
