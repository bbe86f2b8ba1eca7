"""In-process participant services with realistic failure modes.

* inventory: unknown SKU and out-of-stock are permanent failures.
* payments: card ``tok_declined`` is declined; ``tok_flaky`` fails transiently once, then works.
* shipping: region ``atlantis`` is not served; region ``slow-lane`` answers long after the step
  timeout, so the orchestrator retries, gives up and compensates.

Every service keys its effects on the command's idempotency key and keeps a ledger of what it
did, so the sample can show that nothing was applied twice and everything undone was done.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagas_abstractions import ParticipantError, RetryableError
from sagas_core import CommandContext, Participant
from samples.order_processing.messages import (
    CancelShipment,
    CreateShipment,
    InventoryReserved,
    PaymentProcessed,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
    ShipmentCreated,
)

if TYPE_CHECKING:
    from decimal import Decimal


@dataclass
class Ledger:
    """Every effect applied, as (service, action, order id)."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, service: str, action: str, order_id: str) -> None:
        """Note one applied effect."""
        self.entries.append((service, action, order_id))

    def for_order(self, order_id: str) -> list[str]:
        """The actions applied for one order, in order."""
        return [f"{service}.{action}" for service, action, oid in self.entries if oid == order_id]


@dataclass
class StockService:
    """Stock levels and reservations."""

    ledger: Ledger
    stock: dict[str, int] = field(
        default_factory=lambda: {"BOOK-1": 100, "LAMP-2": 5, "DESK-3": 1, "PEN-4": 1_000}
    )
    reservations: dict[str, dict[str, int]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def reserve(self, order_id: str, lines: dict[str, int]) -> str:
        """Hold stock for an order, all lines or none."""
        for sku, quantity in lines.items():
            if sku not in self.stock:
                raise ParticipantError(f"unknown SKU {sku}", code="unknown_sku")
            if self.stock[sku] < quantity:
                raise ParticipantError(
                    f"only {self.stock[sku]} of {sku} left, {quantity} wanted", code="out_of_stock"
                )
        for sku, quantity in lines.items():
            self.stock[sku] -= quantity
        reservation_id = f"RSV-{next(self._ids):04d}"
        self.reservations[reservation_id] = dict(lines)
        self.ledger.record("inventory", "reserve", order_id)
        return reservation_id

    def release(self, order_id: str, reservation_id: str | None) -> None:
        """Give a reservation's stock back (nothing to do if it never happened)."""
        if reservation_id is None or reservation_id not in self.reservations:
            return
        for sku, quantity in self.reservations.pop(reservation_id).items():
            self.stock[sku] += quantity
        self.ledger.record("inventory", "release", order_id)


@dataclass
class PaymentGateway:
    """Charges and refunds."""

    ledger: Ledger
    charges: dict[str, Decimal] = field(default_factory=dict)
    _flaky_seen: set[str] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def charge(self, order_id: str, amount: Decimal, card_token: str, key: str) -> str:
        """Charge a card; ``tok_declined`` is declined, ``tok_flaky`` times out once."""
        if card_token == "tok_declined":
            raise ParticipantError("card declined by issuer", code="card_declined")
        if card_token == "tok_flaky" and key not in self._flaky_seen:
            self._flaky_seen.add(key)
            raise RetryableError("payment gateway timed out", code="gateway_timeout")
        payment_id = f"PAY-{next(self._ids):04d}"
        self.charges[payment_id] = amount
        self.ledger.record("payments", "charge", order_id)
        return payment_id

    def refund(self, order_id: str, payment_id: str | None) -> None:
        """Refund a charge (nothing to do if it never happened)."""
        if payment_id is None or self.charges.pop(payment_id, None) is None:
            return
        self.ledger.record("payments", "refund", order_id)


@dataclass
class ShippingService:
    """Shipment bookings."""

    ledger: Ledger
    slow_seconds: float = 1.5
    shipments: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def book(self, order_id: str, region: str) -> str:
        """Book a shipment; ``atlantis`` is not served and ``slow-lane`` is very slow."""
        if region == "atlantis":
            raise ParticipantError(
                f"no carrier serves region {region!r}", code="region_unavailable"
            )
        if region == "slow-lane":
            await asyncio.sleep(self.slow_seconds)
        shipment_id = f"SHP-{next(self._ids):04d}"
        self.shipments[order_id] = shipment_id
        self.ledger.record("shipping", "ship", order_id)
        return shipment_id

    def cancel(self, order_id: str) -> None:
        """Cancel the order's shipment, if one was booked."""
        if self.shipments.pop(order_id, None) is not None:
            self.ledger.record("shipping", "cancel", order_id)


def build_participants(
    ledger: Ledger, *, slow_seconds: float = 1.5
) -> tuple[list[Participant], StockService, PaymentGateway, ShippingService]:
    """The three participant services of the sample, wired to fresh in-memory backends."""
    stock = StockService(ledger)
    gateway = PaymentGateway(ledger)
    shipping = ShippingService(ledger, slow_seconds=slow_seconds)

    inventory = Participant("inventory").provide(StockService, stock)
    payments = Participant("payments").provide(PaymentGateway, gateway)
    carrier = Participant("shipping").provide(ShippingService, shipping)

    @inventory.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, service: StockService) -> InventoryReserved:
        wanted: dict[str, int] = {}
        for line in cmd.lines:
            wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
        return InventoryReserved(reservation_id=service.reserve(cmd.order_id, wanted))

    @inventory.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory, service: StockService) -> None:
        service.release(cmd.order_id, cmd.reservation_id)

    @payments.handles(ProcessPayment)
    async def pay(
        cmd: ProcessPayment, service: PaymentGateway, context: CommandContext
    ) -> PaymentProcessed:
        payment_id = service.charge(
            cmd.order_id, cmd.amount, cmd.card_token, context.idempotency_key
        )
        return PaymentProcessed(payment_id=payment_id)

    @payments.handles(RefundPayment)
    async def refund(cmd: RefundPayment, service: PaymentGateway) -> None:
        service.refund(cmd.order_id, cmd.payment_id)

    @carrier.handles(CreateShipment)
    async def ship(cmd: CreateShipment, service: ShippingService) -> ShipmentCreated:
        return ShipmentCreated(shipment_id=await service.book(cmd.order_id, cmd.region))

    @carrier.handles(CancelShipment)
    async def cancel(cmd: CancelShipment, service: ShippingService) -> None:
        service.cancel(cmd.order_id)

    return [inventory, payments, carrier], stock, gateway, shipping
