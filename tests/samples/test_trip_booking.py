"""The trip-booking sample: five steps, undone newest first, in under 200 lines."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel

from sagas_abstractions import SagaStatus
from sagas_core.testing import SagaTestHarness
from samples.trip_booking.__main__ import main
from samples.trip_booking.demo import run_demo
from samples.trip_booking.participants import Agency, build_participants
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
    TripData,
    trip_saga,
)

SAMPLE = Path(__file__).parents[2] / "samples" / "trip_booking"

FORWARD = ["BookFlight", "BookHotel", "RentCar", "ChargeCard", "SendConfirmation"]


def _trip(city: str = "Lisbon", card: str = "tok_visa") -> TripData:
    return TripData(
        trip_id="TRIP-0001",
        email="ada@example.com",
        origin="Berlin",
        city=city,
        check_in=date(2026, 6, 1),
        check_out=date(2026, 6, 8),
        card_token=card,
        total=Decimal("1240.00"),
    )


def _stubbed(*scripted_by_test: type[BaseModel]) -> SagaTestHarness:
    """A harness whose stubs succeed, except the commands the test scripts itself."""
    harness = SagaTestHarness(trip_saga)
    replies: list[tuple[str, type[BaseModel], dict[str, str]]] = [
        ("flights", BookFlight, {"flight_ref": "FLI-1"}),
        ("hotels", BookHotel, {"hotel_ref": "HOT-1"}),
        ("cars", RentCar, {"car_ref": "CAR-1"}),
        ("payments", ChargeCard, {"payment_ref": "PAY-1"}),
        ("notifications", SendConfirmation, {}),
        ("flights", CancelFlight, {}),
        ("hotels", CancelHotel, {}),
        ("cars", CancelCar, {}),
        ("payments", RefundCard, {}),
    ]
    for destination, command, reply in replies:
        if command not in scripted_by_test:
            harness.stub(destination).on(command).succeed(reply)
    return harness


async def test_books_flight_hotel_car_then_charges_and_confirms() -> None:
    harness = _stubbed()

    saga = await harness.start(_trip())

    assert saga.status is SagaStatus.COMPLETED
    assert harness.commands(saga.saga_id) == FORWARD
    assert {k: saga.data[k] for k in ("flight_ref", "hotel_ref", "car_ref", "payment_ref")} == {
        "flight_ref": "FLI-1",
        "hotel_ref": "HOT-1",
        "car_ref": "CAR-1",
        "payment_ref": "PAY-1",
    }


async def test_no_car_available_cancels_the_hotel_then_the_flight() -> None:
    harness = _stubbed(RentCar)
    harness.stub("cars").on(RentCar).fail("no_car")

    saga = await harness.start(_trip())

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["CancelHotel", "CancelFlight"]
    assert "ChargeCard" not in harness.commands(saga.saga_id)


async def test_a_declined_payment_cancels_car_hotel_and_flight_in_reverse_order() -> None:
    harness = _stubbed(ChargeCard)
    harness.stub("payments").on(ChargeCard).fail("card_declined")

    saga = await harness.start(_trip())

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["CancelCar", "CancelHotel", "CancelFlight"]
    assert await harness.compensated_steps(saga.saga_id) == [
        "rent-car",
        "book-hotel",
        "book-flight",
    ]


async def test_real_suppliers_hold_no_booking_and_get_the_car_back_after_a_declined_card() -> None:
    agency = Agency()
    harness = SagaTestHarness(trip_saga)
    for participant in build_participants(agency):
        harness.add_participant(participant)

    saga = await harness.start(_trip(card="tok_declined"))

    assert saga.status is SagaStatus.COMPENSATED
    assert agency.journal == [
        "flights.book TRIP-0001",
        "hotels.book TRIP-0001",
        "cars.book TRIP-0001",
        "cars.cancel TRIP-0001",
        "hotels.cancel TRIP-0001",
        "flights.cancel TRIP-0001",
    ]
    assert all(not s.bookings for s in agency.suppliers.values())
    assert agency.cars_left["Lisbon"] == 5


async def test_a_repeated_booking_with_the_same_idempotency_key_books_once() -> None:
    agency = Agency()
    flights = agency.suppliers["flights"]

    first = flights.book("TRIP-0001", key="k-flight")
    again = flights.book("TRIP-0001", key="k-flight")

    assert first == again
    assert agency.journal == ["flights.book TRIP-0001"]


def _non_blank_lines(*names: str) -> int:
    return sum(
        1
        for name in names
        for line in (SAMPLE / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    )


def test_the_saga_and_its_participants_fit_in_under_200_non_blank_lines() -> None:
    lines = _non_blank_lines("saga.py", "participants.py")

    assert lines < 200
    stated = re.search(r"(\d+) non-blank lines", (SAMPLE / "README.md").read_text("utf-8"))
    assert stated is not None, "the README states the line count"
    assert int(stated.group(1)) == lines, "the README states the current line count"


async def test_the_demo_ends_every_trip_as_its_scenario_expects() -> None:
    results, agency = await run_demo(settle_within=10)

    assert [r.scenario.name for r in results if not r.as_expected] == []
    assert agency.cars_left == {"Lisbon": 4, "Reykjavik": 0}


def test_the_command_line_runs_the_demo_in_memory_and_exits_zero() -> None:
    assert main(["--memory"]) == 0
