"""The trip-booking saga: flight -> hotel -> car -> payment -> confirmation.

Each booking is undone if a later step fails for good, newest first; the confirmation is last
and needs no undo. This file and ``participants.py`` are the whole sample: under 200 lines.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, Field

from sagas_core import SagaBuilder

Money = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2)]
"""An amount of money: never negative, two decimals."""

Email = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", max_length=254)]
"""An e-mail address (checked for shape only)."""

TripId = Annotated[str, Field(pattern=r"^TRIP-[0-9]{4,10}$")]
"""A trip reference, ``TRIP-0001``."""


class TripData(BaseModel):
    """The saga data: the trip asked for, plus each booking's reference once made."""

    trip_id: TripId
    email: Email
    origin: str = Field(min_length=3)
    city: str = Field(min_length=3)
    check_in: date
    check_out: date
    card_token: str
    total: Money
    flight_ref: str | None = None
    hotel_ref: str | None = None
    car_ref: str | None = None
    payment_ref: str | None = None


class BookFlight(BaseModel):
    """Book a seat from ``origin`` to ``city`` on ``check_in``."""

    trip_id: TripId
    origin: str
    city: str
    check_in: date


class BookHotel(BaseModel):
    """Book a room in ``city`` for the stay."""

    trip_id: TripId
    city: str
    check_in: date
    check_out: date


class RentCar(BaseModel):
    """Rent a car in ``city`` for the stay."""

    trip_id: TripId
    city: str
    check_in: date
    check_out: date


class ChargeCard(BaseModel):
    """Charge the trip's total to the traveller's card."""

    trip_id: TripId
    card_token: str
    total: Money


class SendConfirmation(BaseModel):
    """E-mail the itinerary to the traveller."""

    trip_id: TripId
    email: Email


class CancelFlight(BaseModel):
    """Compensation: cancel the trip's flight."""

    trip_id: TripId


class CancelHotel(BaseModel):
    """Compensation: cancel the trip's room."""

    trip_id: TripId


class CancelCar(BaseModel):
    """Compensation: cancel the trip's car."""

    trip_id: TripId


class RefundCard(BaseModel):
    """Compensation: refund the trip's charge."""

    trip_id: TripId


trip_saga = (
    SagaBuilder("trip-booking", data=TripData)
    .step("book-flight")
    .send(BookFlight, to="flights")
    .timeout(seconds=2)
    .compensate_with(CancelFlight)
    .step("book-hotel")
    .send(BookHotel, to="hotels")
    .timeout(seconds=2)
    .compensate_with(CancelHotel)
    .step("rent-car")
    .send(RentCar, to="cars")
    .timeout(seconds=2)
    .compensate_with(CancelCar)
    .step("charge-card")
    .send(ChargeCard, to="payments")
    .timeout(seconds=2)
    .compensate_with(RefundCard)
    .step("send-confirmation")
    .send(SendConfirmation, to="notifications")
    .timeout(seconds=2)
    .retry(attempts=3)  # an e-mail is safe to retry: the outbox is keyed on the command
    .saga_timeout(minutes=5)
    .build()
)
"""The trip-booking saga definition."""
