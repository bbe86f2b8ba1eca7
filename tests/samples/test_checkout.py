"""The checkout sample: PlaceOrder -> ProcessPayment -> ReserveInventory, and its undo paths."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from sagas_abstractions import SagaStatus
from sagas_core.testing import SagaTestHarness
from samples.checkout.__main__ import main
from samples.checkout.demo import run_demo
from samples.checkout.messages import (
    CancelOrder,
    CartItem,
    CheckoutData,
    PlaceOrder,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
)
from samples.checkout.saga import checkout_saga
from samples.checkout.services import Shop, build_participants


def _checkout(card: str = "tok_visa", sku: str = "MUG-1", quantity: int = 2) -> CheckoutData:
    item = CartItem(sku=sku, quantity=quantity, unit_price=Decimal("12.50"))
    return CheckoutData.for_cart("ORD-1001", "CUS-001", [item], card)


def _harness(*scripted_by_test: type[BaseModel]) -> SagaTestHarness:
    """A harness whose stubs succeed, except the commands the test scripts itself."""
    harness = SagaTestHarness(checkout_saga)
    replies: list[tuple[str, type[BaseModel], dict[str, str]]] = [
        ("orders", PlaceOrder, {}),
        ("orders", CancelOrder, {}),
        ("payments", ProcessPayment, {"payment_id": "PAY-1"}),
        ("payments", RefundPayment, {}),
        ("inventory", ReserveInventory, {"reservation_id": "RSV-1"}),
        ("inventory", ReleaseInventory, {}),
    ]
    for destination, command, reply in replies:
        if command not in scripted_by_test:
            harness.stub(destination).on(command).succeed(reply)
    return harness


async def test_places_the_order_then_charges_then_reserves_on_the_happy_path() -> None:
    harness = _harness()

    saga = await harness.start(_checkout())

    assert saga.status is SagaStatus.COMPLETED
    assert harness.commands(saga.saga_id) == ["PlaceOrder", "ProcessPayment", "ReserveInventory"]
    assert saga.data["payment_id"] == "PAY-1"
    assert saga.data["reservation_id"] == "RSV-1"


async def test_a_declined_payment_cancels_the_order_and_reserves_nothing() -> None:
    harness = _harness(ProcessPayment)
    harness.stub("payments").on(ProcessPayment).fail("card_declined")

    saga = await harness.start(_checkout())

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["CancelOrder"]
    assert "ReserveInventory" not in harness.commands(saga.saga_id)


async def test_an_inventory_failure_refunds_the_payment_then_cancels_the_order() -> None:
    harness = _harness(ReserveInventory)
    harness.stub("inventory").on(ReserveInventory).fail("out_of_stock")

    saga = await harness.start(_checkout())

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["RefundPayment", "CancelOrder"]
    refund = harness.stub("payments").on(RefundPayment).received[0]
    assert refund.payload["payment_id"] == "PAY-1"


async def test_an_inventory_timeout_releases_refunds_and_cancels_in_reverse_order() -> None:
    harness = _harness(ReserveInventory)
    harness.stub("inventory").on(ReserveInventory).never_answer(times=5)

    saga = await harness.start(_checkout())
    assert saga.status is SagaStatus.RUNNING
    await harness.advance(5)
    saga = await harness.saga(saga.saga_id)

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == [
        "ReleaseInventory",
        "RefundPayment",
        "CancelOrder",
    ]
    assert await harness.compensated_steps(saga.saga_id) == [
        "reserve-inventory",
        "process-payment",
        "place-order",
    ]


async def test_real_services_hold_nothing_for_an_order_that_ran_out_of_stock() -> None:
    shop = Shop()
    harness = SagaTestHarness(checkout_saga)
    for participant in build_participants(shop):
        harness.add_participant(participant)

    saga = await harness.start(_checkout(sku="POSTER-3", quantity=3))

    assert saga.status is SagaStatus.COMPENSATED
    assert shop.journal.for_order("ORD-1001") == [
        "orders.place",
        "payments.charge",
        "payments.refund",
        "orders.cancel",
    ]
    assert shop.orders.orders["ORD-1001"] == "cancelled"
    assert shop.payments.captured == 0
    assert shop.warehouse.stock["POSTER-3"] == 1


async def test_a_repeated_command_with_the_same_idempotency_key_is_applied_once() -> None:
    shop = Shop()
    item = CartItem(sku="MUG-1", quantity=2, unit_price=Decimal("12.50"))

    first = shop.payments.charge("ORD-1001", Decimal("25.00"), "tok_visa", key="k-pay")
    again = shop.payments.charge("ORD-1001", Decimal("25.00"), "tok_visa", key="k-pay")
    reserved = await shop.warehouse.reserve("ORD-1001", [item], key="k-stock")
    reserved_again = await shop.warehouse.reserve("ORD-1001", [item], key="k-stock")
    shop.orders.place("ORD-1001", key="k-order")
    shop.orders.place("ORD-1001", key="k-order")

    assert (first, reserved) == (again, reserved_again)
    assert shop.payments.captured == Decimal("25.00")
    assert shop.warehouse.stock["MUG-1"] == 48
    assert shop.journal.for_order("ORD-1001") == [
        "payments.charge",
        "inventory.reserve",
        "orders.place",
    ]


def test_checkout_data_rejects_a_total_that_does_not_match_the_items() -> None:
    data = _checkout().model_dump()
    with pytest.raises(ValidationError, match="does not match the items"):
        CheckoutData.model_validate({**data, "total": "1.00"})


@pytest.mark.parametrize("price", ["-1.00", "1.005"])
def test_money_is_never_negative_and_has_at_most_two_decimals(price: str) -> None:
    with pytest.raises(ValidationError):
        CartItem(sku="MUG-1", quantity=1, unit_price=Decimal(price))


async def test_the_demo_ends_every_checkout_as_its_scenario_expects() -> None:
    results, shop = await run_demo(settle_within=10)

    assert [r.scenario.name for r in results if not r.as_expected] == []
    assert {r.status for r in results} == {SagaStatus.COMPLETED, SagaStatus.COMPENSATED}
    # Only the two completed orders are still charged: every compensated one was refunded.
    assert shop.payments.captured == Decimal("25.00") + Decimal("32.49")


def test_the_command_line_runs_the_demo_in_memory_and_exits_zero() -> None:
    assert main(["--memory"]) == 0
