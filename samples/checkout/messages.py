"""Domain types, saga data and the commands/replies of the checkout saga."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Money = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2)]
"""An amount of money: never negative, two decimals."""

OrderId = Annotated[str, Field(pattern=r"^ORD-[0-9]{4,10}$")]
"""An order number, ``ORD-1001``."""

CustomerId = Annotated[str, Field(pattern=r"^CUS-[0-9]{3,10}$")]
"""A customer number, ``CUS-042``."""

Sku = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Z0-9-]+$")]
"""A stock-keeping unit, ``MUG-1``."""


class CartItem(BaseModel):
    """One line of the cart being checked out."""

    model_config = ConfigDict(frozen=True)

    sku: Sku
    quantity: int = Field(gt=0, le=1_000)
    unit_price: Money


class CheckoutData(BaseModel):
    """The saga data: the cart and payment method, plus what each step learns."""

    order_id: OrderId
    customer_id: CustomerId
    items: list[CartItem] = Field(min_length=1)
    total: Money
    card_token: str = Field(min_length=1)
    payment_id: str | None = None
    reservation_id: str | None = None

    @model_validator(mode="after")
    def _total_matches_items(self) -> Self:
        expected = sum((i.unit_price * i.quantity for i in self.items), start=Decimal("0.00"))
        if self.total != expected:
            raise ValueError(f"total {self.total} does not match the items ({expected})")
        return self

    @classmethod
    def for_cart(
        cls, order_id: str, customer_id: str, items: list[CartItem], card_token: str
    ) -> CheckoutData:
        """The checkout of ``items``, its total computed from them."""
        total = sum((i.unit_price * i.quantity for i in items), start=Decimal("0.00"))
        return cls(
            order_id=order_id,
            customer_id=customer_id,
            items=items,
            total=total,
            card_token=card_token,
        )


# Orders ----------------------------------------------------------------------------------------


class PlaceOrder(BaseModel):
    """Record the order as placed (pending payment and stock)."""

    order_id: OrderId
    customer_id: CustomerId
    total: Money


class CancelOrder(BaseModel):
    """Compensation: mark the order cancelled."""

    order_id: OrderId


# Payments --------------------------------------------------------------------------------------


class ProcessPayment(BaseModel):
    """Charge the customer's card for the order total."""

    order_id: OrderId
    customer_id: CustomerId
    total: Money
    card_token: str


class PaymentProcessed(BaseModel):
    """The card was charged."""

    payment_id: str


class RefundPayment(BaseModel):
    """Compensation: refund the order's charge (found by order id if the reply was lost)."""

    order_id: OrderId
    payment_id: str | None = None


# Inventory -------------------------------------------------------------------------------------


class ReserveInventory(BaseModel):
    """Reserve stock for every item of the order, all or nothing."""

    order_id: OrderId
    items: list[CartItem]


class InventoryReserved(BaseModel):
    """Stock is held under ``reservation_id``."""

    reservation_id: str


class ReleaseInventory(BaseModel):
    """Compensation: give the order's reserved stock back."""

    order_id: OrderId
