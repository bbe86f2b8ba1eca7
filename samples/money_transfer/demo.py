"""Run named transfers, then a storm of concurrent ones, and check the books still balance."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from sagas_abstractions import SagaStatus, StepStatus
from sagas_core import SagaRuntime
from samples import demo_support
from samples.money_transfer.bank import Bank, bank_participant
from samples.money_transfer.messages import TransferData
from samples.money_transfer.saga import transfer_saga

if TYPE_CHECKING:
    from sagas_abstractions import SagaRepository

"""Seconds an outbox claim lasts: what a killed run had claimed goes out again soon."""

OPENING_BALANCES = {
    "ACC-ALICE": "500.00",
    "ACC-BOB": "300.00",
    "ACC-CAROL": "100.00",
    "ACC-DAVE": "75.00",
    "ACC-ERIN": "50.00",
}
"""The accounts the demo starts from."""

CLOSED = frozenset({"ACC-DAVE"})
"""Accounts that are closed: they refuse postings."""

STORM_ACCOUNTS = ("ACC-ALICE", "ACC-BOB", "ACC-CAROL")
"""The accounts the concurrent storm moves money between, in both directions."""

DONE, UNDONE = SagaStatus.COMPLETED, SagaStatus.COMPENSATED


@dataclass(frozen=True)
class Scenario:
    """One transfer, the statuses it may end in, and the steps it should undo."""

    name: str
    transfer: TransferData
    expected: frozenset[SagaStatus]
    undone: tuple[str, ...] = ()
    outages: int = 0


@dataclass(frozen=True)
class TransferResult:
    """How one transfer ended."""

    scenario: Scenario
    status: SagaStatus
    compensated: list[str]
    error: str | None
    seconds: float

    @property
    def as_expected(self) -> bool:
        """Ended in an expected status and undid exactly the expected steps."""
        undone = self.scenario.undone if self.status is UNDONE else ()
        return self.status in self.scenario.expected and tuple(self.compensated) == undone


@dataclass
class TransferReport:
    """The demo's results and the books before and after."""

    named: list[TransferResult]
    storm: list[TransferResult]
    bank: Bank
    opening: dict[str, Decimal]
    opening_total: Decimal
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """The sum of all balances is what it was, and no balance ever went below zero."""
        return self.bank.total == self.opening_total and self.bank.lowest_balance >= 0

    @property
    def ok(self) -> bool:
        """Every transfer ended as expected and the books balance."""
        return self.balanced and all(r.as_expected for r in [*self.named, *self.storm])


def _transfer(number: int, source: str, destination: str, amount: str) -> TransferData:
    return TransferData(
        transfer_id=f"TRF-{number:04d}",
        source_account=source,
        destination_account=destination,
        amount=Decimal(amount),
    )


def named_scenarios() -> list[Scenario]:
    """One transfer per outcome: completed, insufficient funds, closed account, outage."""
    return [
        Scenario("happy path", _transfer(1, "ACC-ALICE", "ACC-BOB", "120.00"), frozenset({DONE})),
        Scenario(
            "insufficient funds (nothing to undo)",
            _transfer(2, "ACC-ERIN", "ACC-CAROL", "80.00"),
            frozenset({UNDONE}),
        ),
        Scenario(
            "destination closed (debit refunded)",
            _transfer(3, "ACC-CAROL", "ACC-DAVE", "40.00"),
            frozenset({UNDONE}),
            ("debit-source",),
        ),
        Scenario(
            "bank outage, retried",
            _transfer(4, "ACC-BOB", "ACC-ERIN", "25.00"),
            frozenset({DONE}),
            outages=2,
        ),
    ]


def storm_scenarios(count: int = 40) -> list[Scenario]:
    """``count`` concurrent transfers around the storm accounts, both ways; some overdraw."""
    storm = []
    for i in range(count):
        source = STORM_ACCOUNTS[i % 3]
        destination = STORM_ACCOUNTS[(i + 1 + i // 3 % 2) % 3]  # alternate the direction
        amount = f"{5 + (i * 37) % 60}.{(i * 7) % 100:02d}"
        storm.append(
            Scenario(
                "concurrent",
                _transfer(1000 + i, source, destination, amount),
                # Which ones overdraw depends on the order they run in; either way is correct.
                frozenset({DONE, UNDONE}),
            )
        )
    return storm


async def finish_leftovers(store: SagaRepository, *, settle_within: float = 10.0) -> int:
    """Finish the transfers a killed run left in flight in ``store``; returns how many.

    Their bank died with that run, so they finish against a scratch bank of their own and
    cannot touch the books of the new run.
    """
    return await demo_support.finish_leftovers(
        store,
        transfer_saga,
        [bank_participant(Bank.with_balances({}))],
        settle_within=settle_within,
    )


async def run_demo(
    *, store: SagaRepository | None = None, storm: int = 40, settle_within: float = 15.0
) -> TransferReport:
    """Run the named transfers, then ``storm`` concurrent ones, and report on the books.

    Args:
        store: Where saga state lives; in memory by default.
        storm: How many concurrent transfers the storm runs.
        settle_within: Seconds each transfer may take to settle.
    """
    bank = Bank.with_balances(OPENING_BALANCES, closed=CLOSED)
    opening, opening_total = bank.balances(), bank.total
    runtime = SagaRuntime(
        sagas=[transfer_saga],
        participants=[bank_participant(bank)],
        store=store,
        relay_lease=demo_support.RELAY_LEASE,
    )
    began = time.perf_counter()
    async with runtime:

        async def run(scenario: Scenario) -> TransferResult:
            started = time.perf_counter()
            transfer = scenario.transfer
            if scenario.outages:
                bank.inject_outage(transfer.transfer_id, times=scenario.outages)
            saga = await runtime.start_saga(
                transfer_saga, transfer, correlation_id=transfer.transfer_id
            )
            try:
                saga = await runtime.wait_for(saga.saga_id, timeout=settle_within)
            except TimeoutError:  # reported as it stands: still active, so unexpected
                saga = await runtime.orchestrator.get(saga.saga_id)
            return TransferResult(
                scenario=scenario,
                status=saga.status,
                compensated=[
                    s.name for s in reversed(saga.steps) if s.status is StepStatus.COMPENSATED
                ],
                error=None if saga.error is None else f"{saga.error.code}: {saga.error.message}",
                seconds=time.perf_counter() - started,
            )

        named = await asyncio.gather(*(run(s) for s in named_scenarios()))
        stormed = await asyncio.gather(*(run(s) for s in storm_scenarios(storm)))
    return TransferReport(
        named=list(named),
        storm=list(stormed),
        bank=bank,
        opening=opening,
        opening_total=opening_total,
        seconds=time.perf_counter() - began,
    )
