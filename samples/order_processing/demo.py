"""Run a batch of orders through the order saga and report how each ended."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal

from sagas_abstractions import SagaStatus, StepStatus
from sagas_core import SagaRuntime
from samples.order_processing.messages import OrderData, OrderLine
from samples.order_processing.saga import order_saga
from samples.order_processing.services import Ledger, build_participants


@dataclass(frozen=True)
class Scenario:
    """One order of the demo batch and the outcome it should reach."""

    name: str
    order: OrderData
    expected: SagaStatus


@dataclass(frozen=True)
class OrderResult:
    """How one order ended."""

    scenario: Scenario
    saga_id: str
    status: SagaStatus
    steps_done: list[str]
    compensations: list[str]
    effects: list[str]
    error: str | None
    seconds: float

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
            _order("A-1008", [("PEN-4", 1, "1.20")], region="slow-lane"),
            compensated,
        ),
    ]


async def run_demo(*, settle_within: float = 20.0) -> tuple[list[OrderResult], Ledger]:
    """Run every scenario at once on the embedded runtime and collect the results."""
    ledger = Ledger()
    participants, *_ = build_participants(ledger)
    batch = scenarios()
    async with SagaRuntime(sagas=[order_saga], participants=participants) as runtime:
        started = {}
        for scenario in batch:
            began = time.perf_counter()
            saga = await runtime.start_saga(
                order_saga, scenario.order, correlation_id=scenario.order.order_id
            )
            started[saga.saga_id] = (scenario, began)

        async def settle(saga_id: str) -> OrderResult:
            scenario, began = started[saga_id]
            saga = await runtime.wait_for(saga_id, timeout=settle_within)
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
            )

        results = await asyncio.gather(*(settle(saga_id) for saga_id in started))
    return list(results), ledger
