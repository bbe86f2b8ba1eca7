"""Participant services with realistic failure modes, in process or one process each.

* inventory: unknown SKU and out-of-stock are permanent failures.
* payments: card ``tok_declined`` is declined; ``tok_flaky`` fails transiently once, then works.
* shipping: region ``atlantis`` is not served; region ``slow-lane`` answers only after its saga
  gave up on it (the demo opens the lane once every saga settled; a carrier in a process of its
  own waits ``slow_seconds``), so the orchestrator retries, gives up and compensates.

Every service keeps a :class:`Ledger` of the effects it applied, so the sample can show that
nothing was applied twice and everything undone was done.

:func:`build_participants` wires all three for the in-process demo. :func:`inventory`,
:func:`payments` and :func:`shipping` each build one, for a process of its own::

    python -m sagas_rabbitmq.host samples.order_processing.services:payments --prefix shop

Those read two environment variables:

``SAMPLE_LEDGER_FILE``
    A file the ledger appends every effect to, one JSON object a line (``service``, ``action``,
    ``order_id``, ``key``: the command's idempotency key, ``ref``: the reservation, payment or
    shipment id). The ledger loads what the file already holds, so a restarted payments process
    knows the charges its predecessor made (and does not make them again).
``SAMPLE_PAYMENT_LATENCY``
    Seconds the payment gateway takes to answer after capturing a charge (default ``0``): a crash
    in that window leaves a charge applied but unanswered, the case idempotency is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

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

LEDGER_FILE_ENV = "SAMPLE_LEDGER_FILE"
"""Names the file a participant process appends its effects to (JSON lines)."""

PAYMENT_LATENCY_ENV = "SAMPLE_PAYMENT_LATENCY"
"""Seconds the payment gateway takes to answer after capturing a charge."""


SLOW_LANE = "slow-lane"
"""The region whose carrier answers only after its saga gave up on it."""


@dataclass(frozen=True)
class Effect:
    """One applied effect.

    Attributes:
        service: ``inventory``, ``payments`` or ``shipping``.
        action: What was done (``reserve``, ``release``, ``charge``, ``refund``, ``ship``,
            ``cancel``).
        order_id: The order it was done for.
        key: The idempotency key of the command that did it.
        ref: The reservation, payment or shipment it created or undid.
        amount: The money charged or refunded (payments only).
    """

    service: str
    action: str
    order_id: str
    key: str = ""
    ref: str = ""
    amount: str | None = None


@dataclass
class Ledger:
    """Every effect applied, in order; also appended to ``path`` when one is given."""

    entries: list[Effect] = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def open(cls, path: str | Path) -> Ledger:
        """A ledger that appends to ``path``, holding what the file already records."""
        ledger = cls(path=Path(path))
        if ledger.path is not None and ledger.path.exists():
            with ledger.path.open(encoding="utf-8") as lines:
                ledger.entries = [Effect(**json.loads(line)) for line in lines if line.strip()]
        return ledger

    @classmethod
    def from_env(cls) -> Ledger:
        """The ledger file named by ``SAMPLE_LEDGER_FILE``, or an in-memory ledger."""
        path = os.environ.get(LEDGER_FILE_ENV)
        return cls.open(path) if path else cls()

    def record(
        self,
        service: str,
        action: str,
        order_id: str,
        *,
        key: str = "",
        ref: str = "",
        amount: Decimal | None = None,
    ) -> None:
        """Note one applied effect."""
        effect = Effect(
            service, action, order_id, key, ref, None if amount is None else str(amount)
        )
        self.entries.append(effect)
        if self.path is not None:
            # One short write per effect, flushed on close: a crash loses a whole line or none.
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(effect)) + "\n")

    def for_order(self, order_id: str) -> list[str]:
        """The actions applied for one order, in order."""
        return [f"{e.service}.{e.action}" for e in self.entries if e.order_id == order_id]

    def find(self, service: str, action: str, key: str) -> Effect | None:
        """The effect a command with idempotency key ``key`` applied, if it applied one."""
        for effect in self.entries:
            if (effect.service, effect.action, effect.key) == (service, action, key):
                return effect
        return None


@dataclass
class StockService:
    """Stock levels and reservations."""

    ledger: Ledger
    stock: dict[str, int] = field(
        default_factory=lambda: {"BOOK-1": 100, "LAMP-2": 5, "DESK-3": 1, "PEN-4": 1_000}
    )
    reservations: dict[str, dict[str, int]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def reserve(self, order_id: str, lines: dict[str, int], key: str = "") -> str:
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
        self.ledger.record("inventory", "reserve", order_id, key=key, ref=reservation_id)
        return reservation_id

    def release(self, order_id: str, reservation_id: str | None, key: str = "") -> None:
        """Give a reservation's stock back (nothing to do if it never happened)."""
        if reservation_id is None or reservation_id not in self.reservations:
            return
        for sku, quantity in self.reservations.pop(reservation_id).items():
            self.stock[sku] += quantity
        self.ledger.record("inventory", "release", order_id, key=key, ref=reservation_id)


@dataclass
class PaymentGateway:
    """Charges and refunds, idempotent on the command's idempotency key.

    The ledger is the gateway's record: a gateway built on a ledger that already holds charges
    (a restarted process) knows them, so a redelivered command is answered with the charge it
    already made instead of charging twice, and a refund finds the charge to undo.
    """

    ledger: Ledger
    latency: float = 0.0
    charges: dict[str, Decimal] = field(default_factory=dict)
    """Open charges: payment id -> amount."""
    _flaky_seen: set[str] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        made = 0
        for effect in self.ledger.entries:
            if effect.service != "payments":
                continue
            if effect.action == "charge":
                made += 1
                self.charges[effect.ref] = Decimal(effect.amount or 0)
            elif effect.action == "refund":
                self.charges.pop(effect.ref, None)
        self._ids = itertools.count(made + 1)

    async def charge(self, order_id: str, amount: Decimal, card_token: str, key: str) -> str:
        """Charge a card; ``tok_declined`` is declined, ``tok_flaky`` times out once."""
        if card_token == "tok_declined":
            raise ParticipantError("card declined by issuer", code="card_declined")
        done = self.ledger.find("payments", "charge", key)
        if done is not None:
            return done.ref  # charged already (the reply was lost, or this is a retry)
        if card_token == "tok_flaky" and key not in self._flaky_seen:
            self._flaky_seen.add(key)
            raise RetryableError("payment gateway timed out", code="gateway_timeout")
        payment_id = f"PAY-{next(self._ids):04d}"
        self.charges[payment_id] = amount
        self.ledger.record("payments", "charge", order_id, key=key, ref=payment_id, amount=amount)
        if self.latency:
            await asyncio.sleep(self.latency)  # captured; the confirmation is still on its way
        return payment_id

    def refund(self, order_id: str, payment_id: str | None, key: str = "") -> None:
        """Refund a charge (nothing to do if it never happened)."""
        amount = None if payment_id is None else self.charges.pop(payment_id, None)
        if payment_id is None or amount is None:
            return
        self.ledger.record("payments", "refund", order_id, key=key, ref=payment_id, amount=amount)


@dataclass
class ShippingService:
    """Shipment bookings."""

    ledger: Ledger
    slow_seconds: float = 5.0
    """The longest a ``slow-lane`` booking waits for :meth:`open_slow_lane` (far beyond the
    saga's attempts, so that even a carrier nobody opens the lane for answers too late)."""
    shipments: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _slow_lane: asyncio.Event = field(default_factory=asyncio.Event)

    def open_slow_lane(self) -> None:
        """Let the ``slow-lane`` bookings waiting (and to come) go through at once."""
        self._slow_lane.set()

    async def book(self, order_id: str, region: str, key: str = "") -> str:
        """Book a shipment; ``atlantis`` is not served and ``slow-lane`` is very slow.

        A ``slow-lane`` booking waits until the lane is opened, ``slow_seconds`` at most: the
        demo opens it once its sagas settled, so the carrier answers after the orchestrator gave
        up however fast or slow the machine is, never by a race between two clocks.
        """
        if region == "atlantis":
            raise ParticipantError(
                f"no carrier serves region {region!r}", code="region_unavailable"
            )
        if region == SLOW_LANE:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slow_lane.wait(), self.slow_seconds)
        shipment_id = f"SHP-{next(self._ids):04d}"
        self.shipments[order_id] = shipment_id
        self.ledger.record("shipping", "ship", order_id, key=key, ref=shipment_id)
        return shipment_id

    def cancel(self, order_id: str, key: str = "") -> None:
        """Cancel the order's shipment, if one was booked."""
        shipment_id = self.shipments.pop(order_id, None)
        if shipment_id is not None:
            self.ledger.record("shipping", "cancel", order_id, key=key, ref=shipment_id)


def inventory_participant(service: StockService) -> Participant:
    """The ``inventory`` participant, serving ``service``."""
    participant = Participant("inventory").provide(StockService, service)

    @participant.handles(ReserveInventory)
    async def reserve(
        cmd: ReserveInventory, stock: StockService, context: CommandContext
    ) -> InventoryReserved:
        wanted: dict[str, int] = {}
        for line in cmd.lines:
            wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
        reservation_id = stock.reserve(cmd.order_id, wanted, context.idempotency_key)
        return InventoryReserved(reservation_id=reservation_id)

    @participant.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory, stock: StockService, context: CommandContext) -> None:
        stock.release(cmd.order_id, cmd.reservation_id, context.idempotency_key)

    return participant


def payments_participant(gateway: PaymentGateway) -> Participant:
    """The ``payments`` participant, serving ``gateway``."""
    participant = Participant("payments").provide(PaymentGateway, gateway)

    @participant.handles(ProcessPayment)
    async def pay(
        cmd: ProcessPayment, service: PaymentGateway, context: CommandContext
    ) -> PaymentProcessed:
        payment_id = await service.charge(
            cmd.order_id, cmd.amount, cmd.card_token, context.idempotency_key
        )
        return PaymentProcessed(payment_id=payment_id)

    @participant.handles(RefundPayment)
    async def refund(cmd: RefundPayment, service: PaymentGateway, context: CommandContext) -> None:
        service.refund(cmd.order_id, cmd.payment_id, context.idempotency_key)

    return participant


def shipping_participant(service: ShippingService) -> Participant:
    """The ``shipping`` participant, serving ``service``."""
    participant = Participant("shipping").provide(ShippingService, service)

    @participant.handles(CreateShipment)
    async def ship(
        cmd: CreateShipment, carrier: ShippingService, context: CommandContext
    ) -> ShipmentCreated:
        shipment_id = await carrier.book(cmd.order_id, cmd.region, context.idempotency_key)
        return ShipmentCreated(shipment_id=shipment_id)

    @participant.handles(CancelShipment)
    async def cancel(
        cmd: CancelShipment, carrier: ShippingService, context: CommandContext
    ) -> None:
        carrier.cancel(cmd.order_id, context.idempotency_key)

    return participant


def build_participants(
    ledger: Ledger, *, slow_seconds: float = 5.0
) -> tuple[list[Participant], StockService, PaymentGateway, ShippingService]:
    """The three participant services of the sample, wired to fresh in-memory backends."""
    stock = StockService(ledger)
    gateway = PaymentGateway(ledger, latency=float(os.environ.get(PAYMENT_LATENCY_ENV) or 0))
    shipping_service = ShippingService(ledger, slow_seconds=slow_seconds)
    participants = [
        inventory_participant(stock),
        payments_participant(gateway),
        shipping_participant(shipping_service),
    ]
    return participants, stock, gateway, shipping_service


def inventory() -> Participant:
    """The inventory participant alone, for ``python -m sagas_rabbitmq.host`` (module docs)."""
    return inventory_participant(StockService(Ledger.from_env()))


def payments() -> Participant:
    """The payments participant alone, for ``python -m sagas_rabbitmq.host`` (module docs)."""
    latency = float(os.environ.get(PAYMENT_LATENCY_ENV, "0"))
    return payments_participant(PaymentGateway(Ledger.from_env(), latency=latency))


def shipping() -> Participant:
    """The shipping participant alone, for ``python -m sagas_rabbitmq.host`` (module docs)."""
    return shipping_participant(ShippingService(Ledger.from_env()))
