"""Domain types, saga data and the commands/replies of the order saga."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Money = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2)]
"""An amount of money: never negative, two decimals."""

Quantity = Annotated[int, Field(gt=0, le=10_000)]
"""How many of an item: at least one."""

Sku = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Z0-9-]+$")]


class OrderLine(BaseModel):
    """One line of an order."""

    model_config = ConfigDict(frozen=True)

    sku: Sku
    quantity: Quantity
    unit_price: Money


class OrderData(BaseModel):
    """The saga data: the order, plus what each step learns."""

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    lines: list[OrderLine] = Field(min_length=1)
    card_token: str
    region: str
    address: str
    amount: Money = Decimal(0)
    reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None


# Inventory -------------------------------------------------------------------------------------


class ReserveInventory(BaseModel):
    """Reserve stock for every line of an order."""

    order_id: str
    lines: list[OrderLine]


class InventoryReserved(BaseModel):
    """Stock is held under ``reservation_id``."""

    reservation_id: str


class ReleaseInventory(BaseModel):
    """Compensation: give reserved stock back."""

    order_id: str
    reservation_id: str | None = None


# Payments --------------------------------------------------------------------------------------


class ProcessPayment(BaseModel):
    """Charge the customer's card."""

    order_id: str
    customer_id: str
    amount: Money
    card_token: str


class PaymentProcessed(BaseModel):
    """The card was charged."""

    payment_id: str


class RefundPayment(BaseModel):
    """Compensation: refund a charge."""

    order_id: str
    payment_id: str | None = None
    amount: Money


# Shipping --------------------------------------------------------------------------------------


class CreateShipment(BaseModel):
    """Book a shipment for the order."""

    order_id: str
    region: str
    address: str
    lines: list[OrderLine]


class ShipmentCreated(BaseModel):
    """A shipment is booked."""

    shipment_id: str


class CancelShipment(BaseModel):
    """Compensation: cancel a booked shipment (needed when booking timed out: it may exist)."""

    order_id: str
