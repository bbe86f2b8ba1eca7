"""The reservation saga: one per cart line, started, advanced and cancelled by cart events.

``ItemAdded`` starts it and it reserves the line's stock; it then waits for ``OrderCompleted``
and commits the stock. ``ItemRemoved`` (or ``CartCleared``) while it waits, or a wait longer
than the reservation's time to live, compensates it: the stock is released.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sagas_core import SagaBuilder, exponential
from samples.inventory_reservation.messages import (
    CartCleared,
    CommitStock,
    ItemAdded,
    ItemRemoved,
    OrderCompleted,
    ReleaseStock,
    ReservationData,
    ReserveStock,
    StockReserved,
    line_saga_id,
)

if TYPE_CHECKING:
    from sagas_core import SagaDefinition

RESERVATION_TTL = timedelta(minutes=30)
"""How long a line's stock stays held without an order before it is released."""

INVENTORY_TIMEOUT = timedelta(seconds=2)
"""How long the inventory has to answer each reserve or commit attempt."""


def the_line(event: ItemAdded | ItemRemoved) -> str:
    """The saga an event about one line concerns."""
    return line_saga_id(event.cart_id, event.line_id)


def every_line(event: CartCleared | OrderCompleted) -> list[str]:
    """The sagas an event about several lines of a cart concerns: one each."""
    return [line_saga_id(event.cart_id, line_id) for line_id in event.line_ids]


def reservation_saga(ttl: timedelta = RESERVATION_TTL) -> SagaDefinition:
    """The reservation saga, holding stock for at most ``ttl`` without an order.

    A cart may ask for another time to live per line (``ItemAdded.hold_seconds``). Timeouts are
    not part of the definition's fingerprint: a changed ``ttl`` applies to the waits that begin
    after the change, and never parks a running saga.
    """
    return (
        SagaBuilder("inventory-reservation", data=ReservationData)
        .starts_on(ItemAdded, saga_id=the_line)
        # A removal or a cleared cart naming a line that holds nothing has nothing to release.
        .cancel_on(ItemRemoved, saga_id=the_line)
        .cancel_on(CartCleared, saga_id=every_line)
        .when_missing("ignore")
        .step("reserve")
        .send(ReserveStock, to="inventory", reply=StockReserved)
        # Also sent when the reserve timed out or was cancelled in flight: the inventory
        # releases whatever the line holds, and nothing if the reservation never happened.
        .compensate_with(ReleaseStock)
        .timeout(INVENTORY_TIMEOUT)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .step("await-order")
        # An order for a line that holds no stock is not ignored: a human must look at it.
        .wait_for(OrderCompleted, saga_id=every_line, missing="dead-letter")
        .timeout(lambda data: data.hold_seconds or ttl)
        .step("commit")
        .send(CommitStock, to="inventory")
        .timeout(INVENTORY_TIMEOUT)
        .retry(attempts=5, backoff=exponential(0.05, max=1))
        .build()
    )


inventory_reservation_saga = reservation_saga()
"""The reservation saga with the production time to live (30 minutes)."""
