"""The order saga: reserve inventory -> process payment -> create shipment."""

from __future__ import annotations

from sagas_core import SagaBuilder, SagaDefinition, exponential
from samples.order_processing.messages import (
    CancelShipment,
    CreateShipment,
    InventoryReserved,
    OrderData,
    PaymentProcessed,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
    ShipmentCreated,
)


async def price_order(data: OrderData) -> dict[str, str]:
    """Local step: compute the order total from its lines (runs inside the worker)."""
    total = sum((line.unit_price * line.quantity for line in data.lines), start=data.amount * 0)
    return {"amount": str(total)}


def build_order_saga(*, shipment_timeout: float = 1.0) -> SagaDefinition:
    """The order saga.

    ``shipment_timeout`` is the carrier's per-attempt time: 1 s in the demo, where the
    slow-lane carrier answers only after the saga gave up on it; tests with processes on a
    busy machine give it more.
    """
    return (
        SagaBuilder("order-processing", data=OrderData)
        .step("price-order")
        .run(price_order)
        # A local step's command travels over the in-process bus: one in flight when the process
        # dies is lost, and this timeout is what sends it again after a restart.
        .timeout(seconds=1)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .step("reserve-inventory")
        .send(ReserveInventory, to="inventory", reply=InventoryReserved)
        .compensate_with(ReleaseInventory)
        .timeout(seconds=2)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .step("process-payment")
        .send(ProcessPayment, to="payments", reply=PaymentProcessed)
        .compensate_with(RefundPayment)
        .timeout(seconds=2)
        # Four: the flaky card fails once per gateway process, and a restart can lose one attempt.
        .retry(attempts=4, backoff=exponential(0.05, max=0.5))
        .step("create-shipment")
        .send(CreateShipment, to="shipping", reply=ShipmentCreated)
        .compensate_with(CancelShipment)
        .timeout(seconds=shipment_timeout)
        .retry(attempts=2, backoff=exponential(0.05, max=0.2))
        .saga_timeout(minutes=5)  # long enough for a killed demo to be started again and finish
        .build()
    )


order_saga = build_order_saga()
"""The order saga definition."""
