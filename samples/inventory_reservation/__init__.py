"""The inventory-reservation sample: one saga per cart line, started and ended by cart events.

Run it with ``python -m samples.inventory_reservation``.
"""

from samples.inventory_reservation.inventory import Inventory, inventory_participant
from samples.inventory_reservation.messages import (
    CartCleared,
    ItemAdded,
    ItemRemoved,
    OrderCompleted,
    ReservationData,
)
from samples.inventory_reservation.saga import inventory_reservation_saga, reservation_saga

__all__ = [
    "CartCleared",
    "Inventory",
    "ItemAdded",
    "ItemRemoved",
    "OrderCompleted",
    "ReservationData",
    "inventory_participant",
    "inventory_reservation_saga",
    "reservation_saga",
]
