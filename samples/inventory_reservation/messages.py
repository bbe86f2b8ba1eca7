"""The cart's events, the saga data, and the inventory's commands and replies.

The cart and order services publish the events (``ItemAdded``, ``ItemRemoved``, ``CartCleared``,
``OrderCompleted``); the saga never calls them. One saga holds the stock of one cart line, so
its id is the line's: ``<cart_id>:<line_id>`` (see :func:`line_saga_id`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

CartId = Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9-]+$")]
"""A cart id, ``cart-1``: no ``:``, which separates it from the line in a saga id."""

LineId = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9-]+$")]
"""A cart line id, ``L1``: unique within its cart and never reused (it names a saga forever)."""

OrderId = Annotated[str, Field(pattern=r"^ORD-[0-9A-Za-z-]{1,40}$")]
"""An order number, ``ORD-1001``."""

Sku = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Z0-9-]+$")]
"""A stock-keeping unit, ``MUG-1``."""

Quantity = Annotated[int, Field(gt=0, le=1_000)]
"""How many units a line holds."""


def line_saga_id(cart_id: str, line_id: str) -> str:
    """The id of the reservation saga of one cart line."""
    return f"{cart_id}:{line_id}"


# Events the cart and order services publish -------------------------------------------------


HoldSeconds = Annotated[float, Field(gt=0, le=86_400)]
"""How long a line's stock may stay held without an order, in seconds."""


class ItemAdded(BaseModel):
    """A line was added to a cart: starts its reservation saga."""

    cart_id: CartId
    line_id: LineId
    sku: Sku
    quantity: Quantity
    hold_seconds: HoldSeconds | None = None
    """How long the cart asks the stock to be held without an order (the saga's TTL if unset)."""


class ItemRemoved(BaseModel):
    """A line was removed from its cart: its reservation is released."""

    cart_id: CartId
    line_id: LineId


class CartCleared(BaseModel):
    """Every line of a cart was removed at once: each line's reservation is released."""

    cart_id: CartId
    line_ids: list[LineId]


class OrderCompleted(BaseModel):
    """The cart was checked out: the reservations of the ordered lines are committed."""

    cart_id: CartId
    order_id: OrderId
    line_ids: list[LineId] = Field(min_length=1)


# The saga data --------------------------------------------------------------------------------


class ReservationData(BaseModel):
    """The saga data: the line (from ``ItemAdded``), then what the steps and events add."""

    cart_id: CartId
    line_id: LineId
    sku: Sku
    quantity: Quantity
    hold_seconds: HoldSeconds | None = None
    """From ``ItemAdded``: this line's time to live, instead of the saga's."""
    reservation_id: str | None = None
    """Set by the inventory's reply to ``ReserveStock``."""
    order_id: OrderId | None = None
    """Set by ``OrderCompleted`` (its fields merge into the data by name)."""


# Inventory commands and replies ----------------------------------------------------------------


class ReserveStock(BaseModel):
    """Hold ``quantity`` units of ``sku`` for the line (refused when not enough are available)."""

    cart_id: CartId
    line_id: LineId
    sku: Sku
    quantity: Quantity


class StockReserved(BaseModel):
    """The units are held under ``reservation_id``."""

    reservation_id: str


class ReleaseStock(BaseModel):
    """Compensation: give the line's held units back (found by line: the reply may be lost)."""

    cart_id: CartId
    line_id: LineId


class CommitStock(BaseModel):
    """The line was ordered: its held units leave the shelf for good."""

    cart_id: CartId
    line_id: LineId
    order_id: OrderId
