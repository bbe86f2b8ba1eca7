"""A step's timeout computed from the saga data: `.timeout(lambda data: ...)`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import InvalidDefinition, SagaStatus, StepKind, StepStatus
from sagas_core import SagaBuilder
from sagas_core.definition import SagaDefinition
from sagas_core.engine import INVALID_TIMEOUT_CODE
from sagas_core.retry import TIMEOUT_CODE
from sagas_core.testing import SagaTestHarness


class Hold(BaseModel):
    line: str
    hold_seconds: Any = None
    order_id: str | None = None


class Reserve(BaseModel):
    line: str


class Release(BaseModel):
    line: str


class OrderPlaced(BaseModel):
    line: str
    order_id: str


def hold_saga(hold: Any = None) -> SagaDefinition:
    return (
        SagaBuilder("hold", data=Hold)
        .step("reserve")
        .send(Reserve, to="stock")
        .compensate_with(Release)
        .step("await-order")
        .wait_for(OrderPlaced, saga_id="line")
        .timeout(hold or (lambda data: data.hold_seconds))
        .build()
    )


def stock(harness: SagaTestHarness) -> None:
    harness.stub("stock").on(Reserve).succeed()
    harness.stub("stock").on(Release).succeed()


async def test_each_saga_waits_as_long_as_its_own_data_says() -> None:
    harness = SagaTestHarness(hold_saga())
    stock(harness)
    short = await harness.start(Hold(line="a", hold_seconds=1), saga_id="a")
    long = await harness.start(Hold(line="b", hold_seconds=60), saga_id="b")

    assert short.deadline_at == harness.clock.now() + timedelta(seconds=1)
    assert long.deadline_at == harness.clock.now() + timedelta(seconds=60)
    await harness.advance(2)

    expired = await harness.saga("a")
    assert expired.status is SagaStatus.COMPENSATED
    assert expired.error is not None
    assert expired.error.code == TIMEOUT_CODE
    assert expired.error.message == "OrderPlaced did not arrive within 1s"
    assert (await harness.saga("b")).status is SagaStatus.RUNNING
    await harness.publish(OrderPlaced(line="b", order_id="o-1"))
    assert (await harness.saga("b")).status is SagaStatus.COMPLETED


async def test_a_timeout_function_returning_none_waits_without_a_deadline() -> None:
    harness = SagaTestHarness(hold_saga())
    stock(harness)

    saga = await harness.start(Hold(line="a"), saga_id="a")
    await harness.advance(timedelta(days=30))

    assert saga.deadline_at is None
    assert (await harness.saga("a")).status is SagaStatus.RUNNING


async def test_a_remote_step_takes_its_attempt_timeout_from_the_data() -> None:
    saga = (
        SagaBuilder("hold", data=Hold)
        .step("reserve")
        .send(Reserve, to="stock")
        .timeout(lambda data: timedelta(seconds=float(data.hold_seconds)))
        .build()
    )
    harness = SagaTestHarness(saga)
    harness.stub("stock").on(Reserve).never_answer()

    started = await harness.start(Hold(line="a", hold_seconds="2.5"), saga_id="a")
    await harness.advance(3)

    assert started.deadline_at == harness.clock.now() - timedelta(seconds=3) + timedelta(
        seconds=2.5
    )
    timed_out = await harness.saga("a")
    assert timed_out.error is not None
    assert timed_out.error.message == "no reply to attempt 1 within 2.5s"


@pytest.mark.parametrize(
    ("hold", "why"),
    [
        (lambda _data: 1 / 0, "ZeroDivisionError: division by zero"),
        (lambda _data: 0, "ValueError: a timeout must be positive, got 0s"),
        (lambda _data: -5.0, "ValueError: a timeout must be positive, got -5s"),
        (lambda _data: "soon", "TypeError: a timeout must be a timedelta, seconds or None"),
        (lambda _data: True, "TypeError: a timeout must be a timedelta, seconds or None"),
    ],
    ids=["raises", "zero", "negative", "a string", "a bool"],
)
async def test_a_timeout_that_cannot_be_computed_fails_the_step_and_compensates(
    hold: Any, why: str
) -> None:
    harness = SagaTestHarness(hold_saga(hold))
    stock(harness)

    saga = await harness.start(Hold(line="a"), saga_id="a")

    assert saga.status is SagaStatus.COMPENSATED
    assert saga.error is not None
    assert saga.error.code == INVALID_TIMEOUT_CODE
    assert saga.error.message.startswith(
        f"could not compute the timeout of step 'await-order': {why}"
    )
    assert saga.steps[1].status is StepStatus.FAILED
    assert harness.compensations("a") == ["Release"]


async def test_a_compensation_inherits_the_steps_timeout_function_unless_it_has_its_own() -> None:
    def saga(own: float | None) -> SagaDefinition:
        return (
            SagaBuilder("hold", data=Hold)
            .step("reserve")
            .send(Reserve, to="stock")
            .compensate_with(Release, timeout=own)
            .timeout(lambda data: data.hold_seconds)
            .step("fail")
            .send(OrderPlaced, to="orders", map=lambda data: {"line": data.line, "order_id": "x"})
            .build()
        )

    for own, expected in ((None, 7), (3.0, 3)):
        harness = SagaTestHarness(saga(own))
        harness.stub("stock").on(Reserve).succeed()
        harness.stub("stock").on(Release).never_answer()
        harness.stub("orders").on(OrderPlaced).fail("no")

        compensating = await harness.start(Hold(line="a", hold_seconds=7), saga_id="a")

        assert compensating.status is SagaStatus.COMPENSATING
        assert compensating.deadline_at == harness.clock.now() + timedelta(seconds=expected)
        assert harness.commands("a", kind=StepKind.COMPENSATE) == ["Release"]


def test_a_timeout_function_takes_no_other_duration() -> None:
    with pytest.raises(InvalidDefinition, match="a timeout function takes no seconds="):
        (
            SagaBuilder("hold", data=Hold)
            .step("reserve")
            .send(Reserve, to="stock")
            .timeout(lambda _data: 1, seconds=5)
            .build()
        )


def test_a_per_saga_timeout_is_described_as_such_and_keeps_the_fingerprint() -> None:
    fixed = (
        SagaBuilder("hold", data=Hold).step("reserve").send(Reserve, to="stock").timeout(5).build()
    )
    per_saga = (
        SagaBuilder("hold", data=Hold)
        .step("reserve")
        .send(Reserve, to="stock")
        .timeout(lambda _data: 5)
        .build()
    )

    assert per_saga.steps[0].action.describe()["timeout"] == "per saga"
    assert fixed.steps[0].action.describe()["timeout"] == 5
    # Timeouts are not part of what in-flight sagas must agree on (see SagaDefinition).
    assert per_saga.fingerprint == fixed.fingerprint
