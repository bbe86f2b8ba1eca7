"""The inventory service, in memory: a stock ledger and the ``inventory`` participant.

Every unit of a SKU is in exactly one column of the ledger: available, reserved (held for a
cart line) or committed (ordered), so ``available + reserved + committed`` is always the stock
the warehouse started with (:attr:`StockLevel.adds_up`).

* Reserve: refused (permanent ``out_of_stock`` / ``unknown_sku``) when the units are not there;
  made once per idempotency key, so a retried or redelivered command holds the units once.
* Release: gives a held line's units back; a no-op for a line that holds nothing or whose units
  are committed. A release that arrives before its reservation (cancelled while the reserve was
  in flight) is remembered, so the late reservation holds nothing.
* Commit: moves a held line's units to committed; a no-op when they are committed already.

SKUs in :attr:`Inventory.slow_skus` are confirmed slowly (a warehouse that checks the shelf).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from sagas_abstractions import ParticipantError
from sagas_core import CommandContext, Participant
from samples.inventory_reservation.messages import (
    CommitStock,
    ReleaseStock,
    ReserveStock,
    StockReserved,
    line_saga_id,
)


@dataclass
class StockLevel:
    """The ledger of one SKU."""

    on_hand: int
    """Units the warehouse started with."""
    available: int
    reserved: int = 0
    committed: int = 0

    @property
    def adds_up(self) -> bool:
        """Every unit is in exactly one column, and no column is negative."""
        columns = (self.available, self.reserved, self.committed)
        return min(columns) >= 0 and sum(columns) == self.on_hand


class Hold(StrEnum):
    """Where a line's reservation stands."""

    HELD = "held"
    RELEASED = "released"
    COMMITTED = "committed"


@dataclass
class Reservation:
    """Units of one SKU held for one cart line."""

    reservation_id: str
    sku: str
    quantity: int
    state: Hold = Hold.HELD


def _default_stock() -> dict[str, StockLevel]:
    levels = {"MUG-1": 20, "TEE-2": 10, "LAMP-3": 1, "SOFA-7": 3}
    return {sku: StockLevel(on_hand=units, available=units) for sku, units in levels.items()}


@dataclass
class Inventory:
    """Stock levels and the reservation of each cart line (``<cart_id>:<line_id>``)."""

    stock: dict[str, StockLevel] = field(default_factory=_default_stock)
    slow_skus: frozenset[str] = frozenset({"SOFA-7"})
    slow_seconds: float = 2.0
    """The longest a slow SKU's reservation waits for its shelf check (:meth:`confirm`)."""
    reservations: dict[str, Reservation] = field(default_factory=dict)
    journal: list[tuple[str, str]] = field(default_factory=list)
    """Every applied effect, in order: ``(reserve | release | commit, line)``."""
    _by_key: dict[str, str] = field(default_factory=dict)
    _released_early: set[str] = field(default_factory=set)
    _checks: dict[str, asyncio.Event] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def confirm(self, sku: str) -> None:
        """The shelf check of a slow ``sku`` is done: its waiting reservations go ahead."""
        self._shelf_checked(sku).set()

    def _shelf_checked(self, sku: str) -> asyncio.Event:
        return self._checks.setdefault(sku, asyncio.Event())

    async def reserve(
        self, cart_id: str, line_id: str, sku: str, quantity: int, *, key: str
    ) -> str:
        """Hold ``quantity`` of ``sku`` for the line and return the reservation id.

        Raises:
            ParticipantError: ``unknown_sku``, ``out_of_stock``, or ``released`` (the line was
                released before this reservation arrived): permanent, nothing is held.
        """
        if sku in self.slow_skus:
            # The shelf check: until someone confirms it (bounded), then applied in one go.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shelf_checked(sku).wait(), self.slow_seconds)
        if key in self._by_key:  # reserved already: the reply was lost, or this is a retry
            return self.reservations[self._by_key[key]].reservation_id
        line = line_saga_id(cart_id, line_id)
        held = self.reservations.get(line)
        if held is not None and held.state is not Hold.RELEASED:
            return held.reservation_id  # one reservation per line, whatever the key
        if held is not None or line in self._released_early:
            raise ParticipantError(f"line {line} was released already", code="released")
        level = self.stock.get(sku)
        if level is None:
            raise ParticipantError(f"unknown SKU {sku}", code="unknown_sku")
        if level.available < quantity:
            raise ParticipantError(
                f"only {level.available} of {sku} available, {quantity} wanted",
                code="out_of_stock",
            )
        level.available -= quantity
        level.reserved += quantity
        reservation = Reservation(f"RSV-{next(self._ids):04d}", sku, quantity)
        self.reservations[line] = reservation
        self._by_key[key] = line
        self.journal.append(("reserve", line))
        return reservation.reservation_id

    def release(self, cart_id: str, line_id: str) -> None:
        """Give the line's held units back (nothing to do if it holds none or they are sold)."""
        line = line_saga_id(cart_id, line_id)
        reservation = self.reservations.get(line)
        if reservation is None:
            # Never reserved (refused, or still in flight): remember, so a late one holds nothing.
            self._released_early.add(line)
            return
        if reservation.state is not Hold.HELD:
            return
        level = self.stock[reservation.sku]
        level.reserved -= reservation.quantity
        level.available += reservation.quantity
        reservation.state = Hold.RELEASED
        self.journal.append(("release", line))

    def commit(self, cart_id: str, line_id: str) -> None:
        """Move the line's held units to committed (once).

        Raises:
            ParticipantError: ``not_reserved``: the line holds no units to commit.
        """
        line = line_saga_id(cart_id, line_id)
        reservation = self.reservations.get(line)
        if reservation is not None and reservation.state is Hold.COMMITTED:
            return
        if reservation is None or reservation.state is not Hold.HELD:
            raise ParticipantError(f"line {line} holds no stock", code="not_reserved")
        level = self.stock[reservation.sku]
        level.reserved -= reservation.quantity
        level.committed += reservation.quantity
        reservation.state = Hold.COMMITTED
        self.journal.append(("commit", line))

    def effects(self, line: str) -> list[str]:
        """The effects applied for one line, in order."""
        return [effect for effect, on in self.journal if on == line]

    def state_of(self, line: str) -> Hold | None:
        """Where the line's reservation stands (``None``: it never held stock)."""
        reservation = self.reservations.get(line)
        return None if reservation is None else reservation.state

    @property
    def adds_up(self) -> bool:
        """Every SKU's ledger adds up."""
        return all(level.adds_up for level in self.stock.values())


def inventory_participant(inventory: Inventory) -> Participant:
    """The ``inventory`` participant, serving ``inventory``."""
    participant = Participant("inventory").provide(Inventory, inventory)

    @participant.handles(ReserveStock)
    async def reserve(
        cmd: ReserveStock, stock: Inventory, context: CommandContext
    ) -> StockReserved:
        reservation_id = await stock.reserve(
            cmd.cart_id, cmd.line_id, cmd.sku, cmd.quantity, key=context.idempotency_key
        )
        return StockReserved(reservation_id=reservation_id)

    @participant.handles(ReleaseStock)
    async def release(cmd: ReleaseStock, stock: Inventory) -> None:
        stock.release(cmd.cart_id, cmd.line_id)

    @participant.handles(CommitStock)
    async def commit(cmd: CommitStock, stock: Inventory) -> None:
        stock.commit(cmd.cart_id, cmd.line_id)

    return participant
