"""Run a batch of orders through the order saga and report how each ended."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from sagas_abstractions import SagaStatus, StepStatus
from sagas_core import SagaRuntime
from samples import demo_support
from samples.order_processing.messages import OrderData, OrderLine
from samples.order_processing.saga import order_saga
from samples.order_processing.services import (
    SLOW_LANE,
    Ledger,
    ShippingService,
    build_participants,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sagas_abstractions import SagaRepository


@dataclass(frozen=True)
class Scenario:
    """One order of the demo batch and the outcome it should reach."""

    name: str
    order: OrderData
    expected: SagaStatus


@dataclass(frozen=True)
class OrderResult:
    """How one order ended (``resumed``: started by a previous run, finished by this one)."""

    scenario: Scenario
    saga_id: str
    status: SagaStatus
    steps_done: list[str]
    compensations: list[str]
    effects: list[str]
    error: str | None
    seconds: float
    resumed: bool = False

    @property
    def as_expected(self) -> bool:
        """Whether the order ended as its scenario says it should."""
        return self.status is self.scenario.expected


def _order(
    order_id: str,
    lines: list[tuple[str, int, str]],
    *,
    card: str = "tok_visa",
    region: str = "eu-west",
) -> OrderData:
    return OrderData(
        order_id=order_id,
        customer_id=f"cust-{order_id}",
        lines=[OrderLine(sku=s, quantity=q, unit_price=Decimal(p)) for s, q, p in lines],
        card_token=card,
        region=region,
        address="1 Main Street",
    )


def scenarios() -> list[Scenario]:
    """The demo batch: the happy path and each failure mode of the participants."""
    ok, compensated = SagaStatus.COMPLETED, SagaStatus.COMPENSATED
    return [
        Scenario("happy path", _order("A-1001", [("BOOK-1", 2, "12.50")]), ok),
        Scenario(
            "happy path, two lines",
            _order("A-1002", [("PEN-4", 10, "1.20"), ("LAMP-2", 1, "39.00")]),
            ok,
        ),
        Scenario("unknown SKU", _order("A-1003", [("GHOST-9", 1, "5.00")]), compensated),
        Scenario("out of stock", _order("A-1004", [("DESK-3", 3, "199.00")]), compensated),
        Scenario(
            "card declined",
            _order("A-1005", [("BOOK-1", 1, "12.50")], card="tok_declined"),
            compensated,
        ),
        Scenario(
            "flaky gateway, retried",
            _order("A-1006", [("BOOK-1", 1, "12.50")], card="tok_flaky"),
            ok,
        ),
        Scenario(
            "region not served",
            _order("A-1007", [("PEN-4", 3, "1.20")], region="atlantis"),
            compensated,
        ),
        Scenario(
            "shipping too slow (timeout)",
            _order("A-1008", [("PEN-4", 1, "1.20")], region=SLOW_LANE),
            compensated,
        ),
    ]


async def run_demo(
    *,
    store: SagaRepository | None = None,
    settle_within: float = 20.0,
    on_resume: Callable[[int], None] | None = None,
) -> tuple[list[OrderResult], Ledger]:
    """Run every scenario at once on the embedded runtime and collect the results.

    Demo sagas a previous run left active in ``store`` (killed mid-batch) are resumed first:
    the relay republishes what they had committed, their timeouts and retries move them on,
    and they are reported beside the new batch, marked ``resumed``.

    Args:
        store: Where saga state lives; in memory by default.
        settle_within: Seconds each saga may take to settle.
        on_resume: Called with the number of resumed sagas before the new batch starts.
    """
    ledger = Ledger()
    # The slow carrier holds its bookings until its sagas gave up on it (bounded by
    # settle_within): see _open_slow_lane.
    participants, _, _, shipping = build_participants(ledger, slow_seconds=settle_within)
    batch = scenarios()
    by_order = {scenario.order.order_id: scenario for scenario in batch}
    # A short outbox lease: what a killed run had claimed but not published goes out soon.
    runtime = SagaRuntime(
        sagas=[order_saga],
        participants=participants,
        store=store,
        relay_lease=demo_support.RELAY_LEASE,
    )
    started: dict[str, tuple[Scenario, float, bool]] = {}
    began = time.perf_counter()
    for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        for saga in await runtime.store.find(
            status=status, saga_type=order_saga.name, limit=10_000
        ):
            scenario = by_order.get(saga.correlation_id or "")
            if scenario is not None:
                started[saga.saga_id] = (scenario, began, True)
    if on_resume is not None:
        on_resume(len(started))
    async with runtime:
        for scenario in batch:
            began = time.perf_counter()
            saga = await runtime.start_saga(
                order_saga, scenario.order, correlation_id=scenario.order.order_id
            )
            started[saga.saga_id] = (scenario, began, False)

        async def settle(saga_id: str) -> OrderResult:
            scenario, began, resumed = started[saga_id]
            try:
                saga = await runtime.wait_for(saga_id, timeout=settle_within)
            except TimeoutError:  # reported as it stands: still active, so unexpected
                saga = await runtime.orchestrator.get(saga_id)
            elapsed = time.perf_counter() - began
            return OrderResult(
                scenario=scenario,
                saga_id=saga_id,
                status=saga.status,
                steps_done=[s.name for s in saga.steps if s.result is not None],
                compensations=[
                    s.name for s in reversed(saga.steps) if s.status is StepStatus.COMPENSATED
                ],
                effects=ledger.for_order(scenario.order.order_id),
                error=None if saga.error is None else f"{saga.error.code}: {saga.error.message}",
                seconds=elapsed,
                resumed=resumed,
            )

        slow = [saga_id for saga_id, (sc, _, _) in started.items() if sc.order.region == SLOW_LANE]
        opener = asyncio.create_task(_open_slow_lane(runtime, slow, shipping, settle_within))
        try:
            results = await asyncio.gather(*(settle(saga_id) for saga_id in started))
        finally:
            opener.cancel()
            shipping.open_slow_lane()
    return list(results), ledger


async def _open_slow_lane(
    runtime: SagaRuntime, saga_ids: list[str], shipping: ShippingService, within: float
) -> None:
    """Open the slow lane once each of its sagas stopped waiting for the carrier.

    Its bookings then answer late, as the scenario means, however fast or slow the machine is:
    the carrier never races the step timeout. (The compensation, ``CancelShipment``, waits for
    the booking in flight of its step, so the lane must open before the saga can finish.)
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            for saga_id in saga_ids:
                while (await runtime.orchestrator.get(saga_id)).status is SagaStatus.RUNNING:  # noqa: ASYNC110 - polls the row; wait_for waits for an end only
                    await asyncio.sleep(0.02)
    shipping.open_slow_lane()
