"""Book three trips (one goes through, two are undone) and report how each ended."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING

from sagas_abstractions import SagaStatus, StepStatus
from sagas_core import SagaRuntime
from samples import demo_support
from samples.trip_booking.participants import Agency, build_participants
from samples.trip_booking.saga import TripData, trip_saga

if TYPE_CHECKING:
    from sagas_abstractions import SagaRepository

"""Seconds an outbox claim lasts: what a killed run had claimed goes out again soon."""


@dataclass(frozen=True)
class Scenario:
    """One trip, the status it should reach and the steps it should undo, in order."""

    name: str
    trip: TripData
    expected: SagaStatus
    undone: tuple[str, ...] = ()


@dataclass(frozen=True)
class TripResult:
    """How one trip ended and what the suppliers did for it."""

    scenario: Scenario
    status: SagaStatus
    compensated: list[str]
    effects: list[str]
    holds: int
    error: str | None
    seconds: float

    @property
    def as_expected(self) -> bool:
        """Expected status and undo order; all five bookings kept, or none."""
        kept = 5 if self.status is SagaStatus.COMPLETED else 0
        return (
            self.status is self.scenario.expected
            and tuple(self.compensated) == self.scenario.undone
            and self.holds == kept
        )


def _trip(number: int, city: str, card: str = "tok_visa") -> TripData:
    return TripData(
        trip_id=f"TRIP-{number:04d}",
        email=f"traveller{number}@example.com",
        origin="Berlin",
        city=city,
        check_in=date(2026, 6, 1),
        check_out=date(2026, 6, 8),
        card_token=card,
        total=Decimal("1240.00"),
    )


def scenarios() -> list[Scenario]:
    """The happy path and the two failure scenarios."""
    return [
        Scenario("happy path", _trip(1, "Lisbon"), SagaStatus.COMPLETED),
        Scenario(
            "no car available",
            _trip(2, "Reykjavik"),
            SagaStatus.COMPENSATED,
            ("book-hotel", "book-flight"),
        ),
        Scenario(
            "payment declined",
            _trip(3, "Lisbon", card="tok_declined"),
            SagaStatus.COMPENSATED,
            ("rent-car", "book-hotel", "book-flight"),
        ),
    ]


async def finish_leftovers(store: SagaRepository, *, settle_within: float = 10.0) -> int:
    """Finish the trips a killed run left in flight, against a scratch agency; how many."""
    return await demo_support.finish_leftovers(
        store, trip_saga, build_participants(Agency()), settle_within=settle_within
    )


async def run_demo(
    *, store: SagaRepository | None = None, settle_within: float = 10.0
) -> tuple[list[TripResult], Agency]:
    """Book every scenario's trip at once on the embedded runtime and collect the results.

    Args:
        store: Where saga state lives; in memory by default.
        settle_within: Seconds each trip may take to settle.
    """
    agency = Agency()
    runtime = SagaRuntime(
        sagas=[trip_saga],
        participants=build_participants(agency),
        store=store,
        relay_lease=demo_support.RELAY_LEASE,
    )
    async with runtime:

        async def run(scenario: Scenario) -> TripResult:
            began = time.perf_counter()
            trip_id = scenario.trip.trip_id
            saga = await runtime.start_saga(trip_saga, scenario.trip, correlation_id=trip_id)
            try:
                saga = await runtime.wait_for(saga.saga_id, timeout=settle_within)
            except TimeoutError:  # reported as it stands: still active, so unexpected
                saga = await runtime.orchestrator.get(saga.saga_id)
            return TripResult(
                scenario=scenario,
                status=saga.status,
                compensated=[
                    s.name for s in reversed(saga.steps) if s.status is StepStatus.COMPENSATED
                ],
                effects=[e.split()[0] for e in agency.journal if e.endswith(f" {trip_id}")],
                holds=sum(trip_id in s.bookings for s in agency.suppliers.values()),
                error=None if saga.error is None else f"{saga.error.code}: {saga.error.message}",
                seconds=time.perf_counter() - began,
            )

        results = await asyncio.gather(*(run(scenario) for scenario in scenarios()))
    return list(results), agency
