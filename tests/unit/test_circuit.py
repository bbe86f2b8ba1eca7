"""The circuit breaker: destinations that keep failing are deferred to, not failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    Compensate,
    EventKind,
    RetryDue,
    SagaStatus,
    Start,
    StepKind,
    StepStatus,
    WaitKind,
)
from sagas_core import SagaBuilder, decide, due_input, fixed
from sagas_core.circuit import CircuitBreaker, CircuitState
from sagas_core.testing import SagaTestHarness

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Data(BaseModel):
    order_id: str


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


saga = (
    SagaBuilder("circuit-demo", data=Data)
    .step("reserve")
    .send(Reserve, to="inventory")
    .compensate_with(Release)
    .timeout(seconds=1)
    .retry(attempts=2, backoff=fixed(0.5))
    .build()
)


def _breaker(threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, open_for=timedelta(seconds=30))


# ---------------------------------------------------------------- the breaker on its own


def test_consecutive_failures_up_to_the_threshold_open_the_circuit() -> None:
    breaker = _breaker(threshold=3)
    for _ in range(2):
        breaker.record_failure("inventory", T0)
    assert breaker.blocked(T0) == {}
    breaker.record_failure("inventory", T0)
    assert breaker.blocked(T0) == {"inventory": T0 + timedelta(seconds=30)}
    assert breaker.status("inventory").state is CircuitState.OPEN


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = _breaker(threshold=2)
    breaker.record_failure("inventory", T0)
    breaker.record_success("inventory")
    breaker.record_failure("inventory", T0)
    assert breaker.blocked(T0) == {}


def test_after_the_open_period_one_probe_goes_through_and_the_rest_wait() -> None:
    breaker = _breaker(threshold=1)
    breaker.record_failure("inventory", T0)
    later = T0 + timedelta(seconds=30)
    assert breaker.blocked(later) == {}  # half-open: the next command is the probe
    assert breaker.status("inventory").state is CircuitState.HALF_OPEN
    breaker.record_sent("inventory")
    assert breaker.blocked(later) == {"inventory": later + breaker.probe_wait}


def test_a_successful_probe_closes_the_circuit_and_a_failed_one_opens_it_again() -> None:
    breaker = _breaker(threshold=1)
    breaker.record_failure("inventory", T0)
    later = T0 + timedelta(seconds=31)
    breaker.blocked(later)
    breaker.record_sent("inventory")
    breaker.record_failure("inventory", later)
    assert breaker.blocked(later) == {"inventory": later + timedelta(seconds=30)}
    again = later + timedelta(seconds=31)
    breaker.blocked(again)
    breaker.record_sent("inventory")
    breaker.record_success("inventory")
    assert breaker.blocked(again) == {}
    assert breaker.status("inventory").state is CircuitState.CLOSED


def test_bad_breaker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="positive"):
        CircuitBreaker(open_for=timedelta())


# ---------------------------------------------------------------- the engine defers


def test_a_command_for_an_open_circuit_is_deferred_without_using_an_attempt() -> None:
    reopens = T0 + timedelta(seconds=20)
    decision = decide(
        saga,
        None,
        Start(saga_id="s1", data={"order_id": "o1"}, at=T0),
        circuits={"inventory": reopens},
    )
    saga_now = decision.instance
    assert decision.commands == ()
    assert saga_now.status is SagaStatus.RUNNING
    assert (saga_now.wait, saga_now.deadline_at) == (WaitKind.RETRY, reopens)
    assert saga_now.steps[0].attempts == 0
    assert saga_now.steps[0].status is StepStatus.PENDING
    assert EventKind.STEP_DEFERRED in [event.kind for event in decision.events]

    due = due_input(saga_now, reopens)
    assert isinstance(due, RetryDue)
    assert due.attempt == 0
    sent = decide(saga, saga_now, due)
    assert [c.message_id for c in sent.commands] == ["s1:reserve:execute:1"]
    assert sent.instance.steps[0].attempts == 1


def test_a_closed_or_elapsed_circuit_does_not_defer() -> None:
    start = Start(saga_id="s1", data={"order_id": "o1"}, at=T0)
    assert decide(saga, None, start, circuits={"inventory": T0}).commands
    assert decide(saga, None, start, circuits={"payments": T0 + timedelta(hours=1)}).commands


def test_a_compensation_for_an_open_circuit_waits_too() -> None:
    started = decide(saga, None, Start(saga_id="s1", data={"order_id": "o1"}, at=T0)).instance
    reopens = T0 + timedelta(seconds=20)
    decision = decide(
        saga,
        started,
        Compensate(at=T0, actor="ops", reason="cancel"),
        circuits={"inventory": reopens},
    )
    assert decision.commands == ()
    assert decision.instance.status is SagaStatus.COMPENSATING
    assert decision.instance.deadline_at == reopens
    resumed = decide(saga, decision.instance, due_input(decision.instance, reopens))  # type: ignore[arg-type]
    assert [c.kind for c in resumed.commands] == [StepKind.COMPENSATE]


# ---------------------------------------------------------------- end to end in the harness


async def test_a_destination_that_keeps_timing_out_opens_its_circuit_and_sagas_wait() -> None:
    breaker = _breaker(threshold=2)
    harness = SagaTestHarness(saga, breaker=breaker)
    reserve = harness.stub("inventory").on(Reserve)
    reserve.never_answer(times=2)
    first = await harness.start(Data(order_id="o1"))
    second = await harness.start(Data(order_id="o2"))

    await harness.advance(3)  # both first attempts time out: two failures open the circuit
    assert breaker.status("inventory").state is CircuitState.OPEN
    assert len(harness.commands()) == 2  # the retries are deferred, not sent and not failed
    for saga_id in (first.saga_id, second.saga_id):
        waiting = await harness.saga(saga_id)
        assert (waiting.status, waiting.steps[0].attempts) == (SagaStatus.RUNNING, 1)

    reserve.answers.clear()
    reserve.succeed()
    await harness.advance(30)  # one probe goes through, succeeds and closes the circuit

    assert breaker.status("inventory").state is CircuitState.CLOSED
    for saga_id in (first.saga_id, second.saga_id):
        assert (await harness.saga(saga_id)).status is SagaStatus.COMPLETED
    assert len(harness.commands()) == 4  # no attempt was used while the circuit was open
