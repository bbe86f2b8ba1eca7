"""The checkout saga: place the order -> process the payment -> reserve the inventory."""

from __future__ import annotations

from sagas_core import SagaBuilder, exponential
from samples.checkout.messages import (
    CancelOrder,
    CheckoutData,
    InventoryReserved,
    PaymentProcessed,
    PlaceOrder,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
)

INVENTORY_TIMEOUT = 0.25
"""Seconds the warehouse has to answer each reservation attempt."""

checkout_saga = (
    SagaBuilder("checkout", data=CheckoutData)
    .step("place-order")
    .send(PlaceOrder, to="orders")
    .compensate_with(CancelOrder)
    .timeout(seconds=2)
    .retry(attempts=3, backoff=exponential(0.05, max=0.5))
    .step("process-payment")
    .send(ProcessPayment, to="payments", reply=PaymentProcessed)
    .compensate_with(RefundPayment)
    .timeout(seconds=2)
    .retry(attempts=3, backoff=exponential(0.05, max=0.5))
    .step("reserve-inventory")
    .send(ReserveInventory, to="inventory", reply=InventoryReserved)
    # A reservation that timed out may still have happened: the engine compensates it too, and
    # the warehouse releases whatever the order holds (nothing, if it never reserved).
    .compensate_with(ReleaseInventory)
    .timeout(seconds=INVENTORY_TIMEOUT)
    .retry(attempts=2, backoff=exponential(0.05, max=0.2))
    .saga_timeout(minutes=5)
    .build()
)
"""The checkout saga definition."""
