"""A three-step travel saga and its participants, shared by the RabbitMQ end-to-end tests.

``book-flight`` -> ``book-hotel`` -> ``book-car``; the car rental refuses trips marked
``fail_car``, so those compensate: the hotel, then the flight, in reverse order.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel

from sagas_abstractions import ParticipantError, SagaStatus, StepKind
from sagas_core import CommandContext, Participant, SagaBuilder, exponential
from sagas_core.definition import SagaDefinition

SAGA_TYPE = "trip-booking"


class TripData(BaseModel):
    trip_id: str
    fail_car: bool = False
    flight_id: str | None = None
    hotel_id: str | None = None
    car_id: str | None = None


class BookFlight(BaseModel):
    trip_id: str


class FlightBooked(BaseModel):
    flight_id: str


class CancelFlight(BaseModel):
    trip_id: str


class BookHotel(BaseModel):
    trip_id: str


class HotelBooked(BaseModel):
    hotel_id: str


class CancelHotel(BaseModel):
    trip_id: str


class BookCar(BaseModel):
    trip_id: str
    fail_car: bool


class CarBooked(BaseModel):
    car_id: str


def trip_saga(step_timeout: float = 5.0) -> SagaDefinition:
    return (
        SagaBuilder(SAGA_TYPE, data=TripData)
        .step("book-flight")
        .send(BookFlight, to="flights", reply=FlightBooked)
        .compensate_with(CancelFlight)
        .timeout(seconds=step_timeout)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .step("book-hotel")
        .send(BookHotel, to="hotels", reply=HotelBooked)
        .compensate_with(CancelHotel)
        .timeout(seconds=step_timeout)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .step("book-car")
        .send(BookCar, to="cars", reply=CarBooked)
        .timeout(seconds=step_timeout)
        .retry(attempts=3, backoff=exponential(0.05, max=0.5))
        .saga_timeout(seconds=60)
        .build()
    )


@dataclass
class Ledger:
    """The participants' side effects: what was applied, and how often per idempotency key."""

    effects: list[tuple[str, str, str]] = field(default_factory=list)
    runs: Counter[str] = field(default_factory=Counter)
    delay: float = 0.0
    path: str | None = None

    async def apply(self, context: CommandContext, service: str, trip_id: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.runs[context.idempotency_key] += 1
        self.effects.append((service, context.kind.value, trip_id))
        if self.path is not None:  # a participant process reports its effects through a file
            with open(self.path, "a", encoding="utf-8") as ledger:  # noqa: PTH123, ASYNC230
                ledger.write(f"{context.idempotency_key}\t{service}\t{context.kind}\t{trip_id}\n")

    def of(self, trip_id: str) -> list[tuple[str, str]]:
        return [(service, kind) for service, kind, trip in self.effects if trip == trip_id]

    def applied_twice(self) -> list[str]:
        return [key for key, runs in self.runs.items() if runs > 1]


def participants(ledger: Ledger, *, flights: bool = True) -> list[Participant]:
    """The flight, hotel and car participants (``flights=False`` leaves flights to another)."""
    hotel, car = Participant("hotels"), Participant("cars")
    hosted = [hotel, car]

    if flights:
        flight = Participant("flights")

        @flight.handles(BookFlight)
        async def book_flight(command: BookFlight, context: CommandContext) -> FlightBooked:
            await ledger.apply(context, "flights", command.trip_id)
            return FlightBooked(flight_id=f"F-{command.trip_id}")

        @flight.handles(CancelFlight)
        async def cancel_flight(command: CancelFlight, context: CommandContext) -> None:
            await ledger.apply(context, "flights", command.trip_id)

        hosted.append(flight)

    @hotel.handles(BookHotel)
    async def book_hotel(command: BookHotel, context: CommandContext) -> HotelBooked:
        await ledger.apply(context, "hotels", command.trip_id)
        return HotelBooked(hotel_id=f"H-{command.trip_id}")

    @hotel.handles(CancelHotel)
    async def cancel_hotel(command: CancelHotel, context: CommandContext) -> None:
        await ledger.apply(context, "hotels", command.trip_id)

    @car.handles(BookCar)
    async def book_car(command: BookCar, context: CommandContext) -> CarBooked:
        if command.fail_car:
            raise ParticipantError("no car left in that city", code="sold_out")
        await ledger.apply(context, "cars", command.trip_id)
        return CarBooked(car_id=f"C-{command.trip_id}")

    return hosted


def hosted() -> list[Participant]:
    """The participants of a separate process (``python -m sagas_rabbitmq.host``).

    Effects go to the file named by ``SAGAS_TEST_LEDGER``.
    """
    return participants(Ledger(path=os.environ["SAGAS_TEST_LEDGER"]))


def read_ledger(path: str) -> Ledger:
    """The effects a participant process wrote to ``path``."""
    ledger = Ledger()
    with open(path, encoding="utf-8") as lines:  # noqa: PTH123
        for line in lines:
            key, service, kind, trip_id = line.rstrip("\n").split("\t")
            ledger.runs[key] += 1
            ledger.effects.append((service, kind, trip_id))
    return ledger


COMPLETED_EFFECTS = [
    ("flights", StepKind.EXECUTE.value),
    ("hotels", StepKind.EXECUTE.value),
    ("cars", StepKind.EXECUTE.value),
]
COMPENSATED_EFFECTS = [
    ("flights", StepKind.EXECUTE.value),
    ("hotels", StepKind.EXECUTE.value),
    ("hotels", StepKind.COMPENSATE.value),
    ("flights", StepKind.COMPENSATE.value),
]
EXPECTED_STATUS = {False: SagaStatus.COMPLETED, True: SagaStatus.COMPENSATED}
