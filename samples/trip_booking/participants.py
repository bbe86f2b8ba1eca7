"""The trip's five participants over in-memory suppliers; every effect keyed on the command.

A booking is made once per idempotency key (:class:`~sagas_core.CommandContext`), so a retried
or redelivered command returns the booking it already made. Cars run out in ``Reykjavik``; card
``tok_declined`` is declined. ``Agency.journal`` lists every effect applied, in order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from sagas_abstractions import ParticipantError
from sagas_core import CommandContext, Participant
from samples.trip_booking.saga import (
    BookFlight,
    BookHotel,
    CancelCar,
    CancelFlight,
    CancelHotel,
    ChargeCard,
    RefundCard,
    RentCar,
    SendConfirmation,
)


@dataclass
class Supplier:
    """One booking system (airline, hotels, car rental, card gateway or mailer)."""

    name: str
    journal: list[str]
    bookings: dict[str, str] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def book(self, trip_id: str, key: str) -> str:
        """Book for a trip once per idempotency key; returns the booking reference."""
        if key not in self.by_key:
            self.by_key[key] = self.bookings[trip_id] = f"{self.name[:3].upper()}-{next(self.ids)}"
            self.journal.append(f"{self.name}.book {trip_id}")
        return self.by_key[key]

    def cancel(self, trip_id: str) -> None:
        """Cancel a trip's booking (nothing to do if it has none)."""
        if self.bookings.pop(trip_id, None) is not None:
            self.journal.append(f"{self.name}.cancel {trip_id}")


@dataclass
class Agency:
    """The suppliers, the cars each city has left (and who rented one), one journal."""

    journal: list[str] = field(default_factory=list)
    cars_left: dict[str, int] = field(default_factory=lambda: {"Lisbon": 5, "Reykjavik": 0})
    rented: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("flights", "hotels", "cars", "payments", "notifications")
        self.suppliers = {name: Supplier(name, self.journal) for name in names}


def build_participants(agency: Agency) -> list[Participant]:
    """One participant per supplier of ``agency``."""
    s = agency.suppliers
    flights = Participant("flights").provide(Supplier, s["flights"])
    hotels = Participant("hotels").provide(Supplier, s["hotels"])
    cars = Participant("cars").provide(Supplier, s["cars"])
    payments = Participant("payments").provide(Supplier, s["payments"])
    mail = Participant("notifications").provide(Supplier, s["notifications"])

    @flights.handles(BookFlight)
    async def book_flight(cmd: BookFlight, it: Supplier, ctx: CommandContext) -> dict[str, str]:
        return {"flight_ref": it.book(cmd.trip_id, ctx.idempotency_key)}

    @hotels.handles(BookHotel)
    async def book_hotel(cmd: BookHotel, it: Supplier, ctx: CommandContext) -> dict[str, str]:
        return {"hotel_ref": it.book(cmd.trip_id, ctx.idempotency_key)}

    @cars.handles(RentCar)
    async def rent_car(cmd: RentCar, it: Supplier, ctx: CommandContext) -> dict[str, str]:
        if ctx.idempotency_key not in it.by_key:
            if agency.cars_left.get(cmd.city, 0) < 1:
                raise ParticipantError(f"no car available in {cmd.city}", code="no_car")
            agency.cars_left[cmd.city] -= 1
            agency.rented[cmd.trip_id] = cmd.city
        return {"car_ref": it.book(cmd.trip_id, ctx.idempotency_key)}

    @payments.handles(ChargeCard)
    async def charge(cmd: ChargeCard, it: Supplier, ctx: CommandContext) -> dict[str, str]:
        if cmd.card_token == "tok_declined":
            raise ParticipantError("card declined by the issuer", code="card_declined")
        return {"payment_ref": it.book(cmd.trip_id, ctx.idempotency_key)}

    @mail.handles(SendConfirmation)
    async def confirm(cmd: SendConfirmation, it: Supplier, ctx: CommandContext) -> None:
        it.book(cmd.trip_id, ctx.idempotency_key)

    @flights.handles(CancelFlight)
    @hotels.handles(CancelHotel)
    @payments.handles(RefundCard)
    async def cancel(cmd: CancelFlight | CancelHotel | RefundCard, it: Supplier) -> None:
        it.cancel(cmd.trip_id)

    @cars.handles(CancelCar)
    async def return_car(cmd: CancelCar, it: Supplier) -> None:
        if (city := agency.rented.pop(cmd.trip_id, None)) is not None:
            agency.cars_left[city] += 1
        it.cancel(cmd.trip_id)

    return [flights, hotels, cars, payments, mail]
