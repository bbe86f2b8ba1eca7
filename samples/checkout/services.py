"""The three participant services of the checkout, in memory, with realistic failure modes.

* orders: records orders; a cancelled order stays on the books as ``cancelled``.
* payments: card ``tok_declined`` is declined (permanent); any other card is charged.
* inventory: unknown SKUs and short stock are permanent failures; SKUs shipped from the freight
  warehouse (``PIANO-9``) take longer to answer than the saga waits, so the step times out.

Every effect is keyed on the command's idempotency key (:class:`~sagas_core.CommandContext`): a
redelivered or retried command finds the effect it already applied and returns it, so nothing
is applied twice. Every applied effect is also written to a shared :class:`Journal`, which the
demo and the tests read.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from decimal import Decimal

from sagas_abstractions import ParticipantError
from sagas_core import CommandContext, Participant
from samples.checkout.messages import (
    CancelOrder,
    CartItem,
    InventoryReserved,
    PaymentProcessed,
    PlaceOrder,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
)


@dataclass
class Journal:
    """Every effect the services applied, in order, as ``(service.action, order_id)``."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def record(self, effect: str, order_id: str) -> None:
        """Note one applied effect."""
        self.entries.append((effect, order_id))

    def for_order(self, order_id: str) -> list[str]:
        """The effects applied for one order, in order."""
        return [effect for effect, order in self.entries if order == order_id]


@dataclass
class OrderBook:
    """Orders and their status (``placed`` or ``cancelled``)."""

    journal: Journal
    orders: dict[str, str] = field(default_factory=dict)
    _applied: set[str] = field(default_factory=set)

    def place(self, order_id: str, key: str) -> None:
        """Record a placed order (once per idempotency key)."""
        if key in self._applied:
            return
        self._applied.add(key)
        self.orders[order_id] = "placed"
        self.journal.record("orders.place", order_id)

    def cancel(self, order_id: str) -> None:
        """Mark an order cancelled (nothing to do if it was never placed or is cancelled)."""
        if self.orders.get(order_id) != "placed":
            return
        self.orders[order_id] = "cancelled"
        self.journal.record("orders.cancel", order_id)


@dataclass
class PaymentGateway:
    """Charges and refunds; a charge is made once per idempotency key."""

    journal: Journal
    charges: dict[str, tuple[str, Decimal]] = field(default_factory=dict)
    """Open charges: order id -> (payment id, amount)."""
    _by_key: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def charge(self, order_id: str, amount: Decimal, card_token: str, key: str) -> str:
        """Charge a card and return the payment id; ``tok_declined`` is declined."""
        if key in self._by_key:
            return self._by_key[key]  # charged already: the reply was lost, or this is a retry
        if card_token == "tok_declined":
            raise ParticipantError("card declined by the issuer", code="card_declined")
        payment_id = f"PAY-{next(self._ids):04d}"
        self._by_key[key] = payment_id
        self.charges[order_id] = (payment_id, amount)
        self.journal.record("payments.charge", order_id)
        return payment_id

    def refund(self, order_id: str) -> None:
        """Refund the order's charge (nothing to do if there is none, or it was refunded)."""
        if self.charges.pop(order_id, None) is not None:
            self.journal.record("payments.refund", order_id)

    @property
    def captured(self) -> Decimal:
        """The money currently held from customers."""
        return sum((amount for _, amount in self.charges.values()), start=Decimal("0.00"))


def _default_stock() -> dict[str, int]:
    return {"MUG-1": 50, "TEE-2": 20, "POSTER-3": 1, "PIANO-9": 2}


@dataclass
class Warehouse:
    """Stock levels and reservations (one per order); a reservation is made once per key."""

    journal: Journal
    stock: dict[str, int] = field(default_factory=_default_stock)
    slow_skus: frozenset[str] = frozenset({"PIANO-9"})
    slow_seconds: float = 1.0
    reservations: dict[str, dict[str, int]] = field(default_factory=dict)
    _by_key: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def reserve(self, order_id: str, items: list[CartItem], key: str) -> str:
        """Hold stock for every item, all or none, and return the reservation id."""
        if key in self._by_key:
            return self._by_key[key]
        wanted: dict[str, int] = {}
        for item in items:
            wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
        for sku, quantity in wanted.items():
            if sku not in self.stock:
                raise ParticipantError(f"unknown SKU {sku}", code="unknown_sku")
            if self.stock[sku] < quantity:
                raise ParticipantError(
                    f"only {self.stock[sku]} of {sku} left, {quantity} wanted", code="out_of_stock"
                )
        if self.slow_skus & wanted.keys():
            await asyncio.sleep(self.slow_seconds)  # the freight warehouse is slow to confirm
        for sku, quantity in wanted.items():
            self.stock[sku] -= quantity
        reservation_id = f"RSV-{next(self._ids):04d}"
        self._by_key[key] = reservation_id
        self.reservations[order_id] = wanted
        self.journal.record("inventory.reserve", order_id)
        return reservation_id

    def release(self, order_id: str) -> None:
        """Give the order's stock back (nothing to do if it holds none)."""
        held = self.reservations.pop(order_id, None)
        if held is None:
            return
        for sku, quantity in held.items():
            self.stock[sku] += quantity
        self.journal.record("inventory.release", order_id)


@dataclass
class Shop:
    """The three services of the checkout, sharing one journal."""

    journal: Journal = field(default_factory=Journal)
    orders: OrderBook = field(init=False)
    payments: PaymentGateway = field(init=False)
    warehouse: Warehouse = field(init=False)

    def __post_init__(self) -> None:
        self.orders = OrderBook(self.journal)
        self.payments = PaymentGateway(self.journal)
        self.warehouse = Warehouse(self.journal)


def orders_participant(book: OrderBook) -> Participant:
    """The ``orders`` participant, serving ``book``."""
    participant = Participant("orders").provide(OrderBook, book)

    @participant.handles(PlaceOrder)
    async def place(cmd: PlaceOrder, orders: OrderBook, context: CommandContext) -> None:
        orders.place(cmd.order_id, context.idempotency_key)

    @participant.handles(CancelOrder)
    async def cancel(cmd: CancelOrder, orders: OrderBook) -> None:
        orders.cancel(cmd.order_id)

    return participant


def payments_participant(gateway: PaymentGateway) -> Participant:
    """The ``payments`` participant, serving ``gateway``."""
    participant = Participant("payments").provide(PaymentGateway, gateway)

    @participant.handles(ProcessPayment)
    async def pay(
        cmd: ProcessPayment, payments: PaymentGateway, context: CommandContext
    ) -> PaymentProcessed:
        payment_id = payments.charge(
            cmd.order_id, cmd.total, cmd.card_token, context.idempotency_key
        )
        return PaymentProcessed(payment_id=payment_id)

    @participant.handles(RefundPayment)
    async def refund(cmd: RefundPayment, payments: PaymentGateway) -> None:
        payments.refund(cmd.order_id)

    return participant


def inventory_participant(warehouse: Warehouse) -> Participant:
    """The ``inventory`` participant, serving ``warehouse``."""
    participant = Participant("inventory").provide(Warehouse, warehouse)

    @participant.handles(ReserveInventory)
    async def reserve(
        cmd: ReserveInventory, stock: Warehouse, context: CommandContext
    ) -> InventoryReserved:
        reservation_id = await stock.reserve(cmd.order_id, cmd.items, context.idempotency_key)
        return InventoryReserved(reservation_id=reservation_id)

    @participant.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory, stock: Warehouse) -> None:
        stock.release(cmd.order_id)

    return participant


def build_participants(shop: Shop) -> list[Participant]:
    """The checkout's three participants, serving ``shop``'s services."""
    return [
        orders_participant(shop.orders),
        payments_participant(shop.payments),
        inventory_participant(shop.warehouse),
    ]
