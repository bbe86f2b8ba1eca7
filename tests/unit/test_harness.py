"""The saga test harness shipped to users drives sagas deterministically."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sagas_abstractions import SagaStatus, StepKind
from sagas_core.testing import SagaTestHarness
from samples.order_processing.messages import (
    CancelShipment,
    CreateShipment,
    OrderData,
    OrderLine,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
)
from samples.order_processing.saga import order_saga


def _order() -> OrderData:
    return OrderData(
        order_id="A-1",
        customer_id="c-1",
        lines=[OrderLine(sku="BOOK-1", quantity=2, unit_price=Decimal("12.50"))],
        card_token="tok_visa",
        region="eu-west",
        address="1 Main Street",
    )


def _happy(harness: SagaTestHarness) -> None:
    harness.stub("inventory").on(ReserveInventory).succeed({"reservation_id": "R-1"})
    harness.stub("inventory").on(ReleaseInventory).succeed()
    harness.stub("payments").on(ProcessPayment).succeed({"payment_id": "P-1"})
    harness.stub("payments").on(RefundPayment).succeed()
    harness.stub("shipping").on(CreateShipment).succeed({"shipment_id": "S-1"})
    harness.stub("shipping").on(CancelShipment).succeed()


async def test_happy_path_completes_and_merges_every_reply_into_the_saga_data() -> None:
    harness = SagaTestHarness(order_saga)
    _happy(harness)

    saga = await harness.start(_order())

    assert saga.status is SagaStatus.COMPLETED
    assert saga.data["amount"] == "25.00"  # computed by the local price-order step
    assert (saga.data["reservation_id"], saga.data["payment_id"], saga.data["shipment_id"]) == (
        "R-1",
        "P-1",
        "S-1",
    )
    assert harness.commands(saga.saga_id) == [
        "order-processing.price-order",
        "ReserveInventory",
        "ProcessPayment",
        "CreateShipment",
    ]
    assert harness.compensations(saga.saga_id) == []
    assert [e.kind.value for e in harness.events][-1] == "completed"


async def test_declined_card_compensates_the_reservation_with_its_id() -> None:
    harness = SagaTestHarness(order_saga)
    _happy(harness)
    harness.stub("payments").on(ProcessPayment).answers.clear()
    harness.stub("payments").on(ProcessPayment).fail("card_declined")

    saga = await harness.start(_order())

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["ReleaseInventory"]
    release = harness.stub("inventory").on(ReleaseInventory).received[0]
    assert release.payload == {"order_id": "A-1", "reservation_id": "R-1"}
    assert await harness.compensated_steps(saga.saga_id) == ["reserve-inventory"]


async def test_transient_failures_are_retried_after_the_backoff_when_time_advances() -> None:
    harness = SagaTestHarness(order_saga)
    _happy(harness)
    payments = harness.stub("payments").on(ProcessPayment)
    payments.answers.clear()
    payments.fail("gateway_timeout", retryable=True, times=2).then_succeed({"payment_id": "P-9"})

    saga = await harness.start(_order())
    assert saga.status is SagaStatus.RUNNING  # waiting for the first retry's backoff

    await harness.advance(5)

    saga = await harness.saga(saga.saga_id)
    assert saga.status is SagaStatus.COMPLETED
    assert saga.data["payment_id"] == "P-9"
    assert harness.commands(saga.saga_id, kind=StepKind.EXECUTE).count("ProcessPayment") == 3


async def test_a_participant_that_never_answers_times_out_and_everything_is_undone() -> None:
    harness = SagaTestHarness(order_saga)
    _happy(harness)
    harness.stub("shipping").on(CreateShipment).answers.clear()
    harness.stub("shipping").on(CreateShipment).never_answer(times=5)

    saga = await harness.start(_order())
    await harness.advance(10)

    saga = await harness.saga(saga.saga_id)
    assert saga.status is SagaStatus.COMPENSATED
    # The booking may have happened without a reply, so it is cancelled too, newest first.
    assert harness.compensations(saga.saga_id) == [
        "CancelShipment",
        "RefundPayment",
        "ReleaseInventory",
    ]


async def test_a_compensation_that_keeps_failing_parks_the_saga_with_one_dead_letter() -> None:
    harness = SagaTestHarness(order_saga)
    _happy(harness)
    harness.stub("payments").on(ProcessPayment).answers.clear()
    harness.stub("payments").on(ProcessPayment).fail("card_declined")
    release = harness.stub("inventory").on(ReleaseInventory)
    release.answers.clear()
    release.fail("warehouse_offline", retryable=True, times=100)

    saga = await harness.start(_order())
    await harness.advance(300)

    saga = await harness.saga(saga.saga_id)
    assert saga.status is SagaStatus.FAILED
    assert len(harness.dead_letters) == 1
    assert harness.dead_letters[0].message_type == "ReleaseInventory"

    release.answers.clear()
    release.succeed()
    await harness.orchestrator.retry_compensation(saga.saga_id, actor="ops", reason="fixed")
    await harness.run_until_idle()
    assert (await harness.saga(saga.saga_id)).status is SagaStatus.COMPENSATED


async def test_strict_harness_names_the_missing_stub() -> None:
    harness = SagaTestHarness(order_saga)
    with pytest.raises(LookupError, match=r"harness\.stub\('inventory'\)"):
        await harness.start(_order())
