"""The order saga as the fault suite runs it, and the worker host (``tests.faults.app:host``).

Same steps, messages and local pricing step as ``samples.order_processing.saga``; only the
timeouts and retries differ: on a small, busy machine a participant killed and restarted is away
for a couple of seconds, and the suite wants those faults to end in retries and late replies
(which the engine must fence off), not in every in-flight saga compensating. Compensations get
many attempts, so a saga is parked as ``failed`` only when a participant stays away for long.
"""

from __future__ import annotations

import os

from sagas_core import RetryPolicy, SagaBuilder, SagaHost, exponential
from sagas_core.settings import load_settings
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
from samples.order_processing.saga import price_order


class OrderPlaced(OrderData):
    """What a shop service publishes: the order, with the saga id it chose (half the suite's
    sagas start this way, over the broker, and a third of those events arrive twice)."""

    saga_id: str


STEP_TIMEOUT_ENV = "FAULTS_STEP_TIMEOUT"
STEP_TIMEOUT = float(os.environ.get(STEP_TIMEOUT_ENV) or 1.5)
"""Per-attempt timeout of every step (``bench/soak.py --step-timeout`` shortens it to provoke
late replies; workers and the test process must agree, or the definition fingerprint differs)."""
FORWARD_ATTEMPTS = 5
_BACKOFF = exponential(0.1, max=1.0)
_UNDO = RetryPolicy(attempts=10, backoff=_BACKOFF)

fault_saga = (
    SagaBuilder("order-faults", data=OrderData)
    .starts_on(OrderPlaced, saga_id="saga_id")
    .step("price-order")
    .run(price_order)
    .timeout(seconds=STEP_TIMEOUT)
    .retry(FORWARD_ATTEMPTS, backoff=_BACKOFF)
    .step("reserve-inventory")
    .send(ReserveInventory, to="inventory", reply=InventoryReserved)
    .compensate_with(ReleaseInventory, timeout=STEP_TIMEOUT, retry=_UNDO)
    .timeout(seconds=STEP_TIMEOUT)
    .retry(FORWARD_ATTEMPTS, backoff=_BACKOFF)
    .step("process-payment")
    .send(ProcessPayment, to="payments", reply=PaymentProcessed)
    .compensate_with(RefundPayment, timeout=STEP_TIMEOUT, retry=_UNDO)
    .timeout(seconds=STEP_TIMEOUT)
    .retry(FORWARD_ATTEMPTS, backoff=_BACKOFF)
    .step("create-shipment")
    .send(CreateShipment, to="shipping", reply=ShipmentCreated)
    .compensate_with(CancelShipment, timeout=STEP_TIMEOUT, retry=_UNDO)
    .timeout(seconds=STEP_TIMEOUT)
    .retry(FORWARD_ATTEMPTS, backoff=_BACKOFF)
    .saga_timeout(minutes=10)
    .build()
)
"""The order saga with fault-suite timeouts."""

FORWARD_STEPS = {
    "reserve-inventory": "reserve",
    "process-payment": "charge",
    "create-shipment": "ship",
}
"""Each remote step and the ledger effect of its execution."""

UNDO_EFFECTS = {
    "reserve-inventory": "release",
    "process-payment": "refund",
    "create-shipment": "cancel",
}
"""Each remote step and the ledger effect of its compensation."""


def host() -> SagaHost:
    """The worker host: the fault saga, settings from ``SAGAS_*``."""
    return SagaHost.builder().use_settings(load_settings()).add_saga(fault_saga).build()
