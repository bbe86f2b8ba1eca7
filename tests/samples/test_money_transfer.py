"""The money-transfer sample: balances add up after every way a transfer can end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from sagas_abstractions import SagaStatus
from sagas_core.testing import SagaTestHarness
from samples.money_transfer.__main__ import main
from samples.money_transfer.bank import Bank, bank_participant
from samples.money_transfer.demo import run_demo
from samples.money_transfer.messages import (
    CreditAccount,
    DebitAccount,
    RefundDebit,
    ReverseCredit,
    TransferData,
)
from samples.money_transfer.saga import transfer_saga

OPENING = {"ACC-ALICE": "100.00", "ACC-BOB": "20.00", "ACC-CLOSED": "5.00"}


def _transfer(source: str, destination: str, amount: str) -> TransferData:
    return TransferData(
        transfer_id="TRF-0001",
        source_account=source,
        destination_account=destination,
        amount=Decimal(amount),
    )


def _stubbed(*scripted_by_test: type[BaseModel]) -> SagaTestHarness:
    """A harness whose bank stub succeeds, except the commands the test scripts itself."""
    harness = SagaTestHarness(transfer_saga)
    replies: list[tuple[type[BaseModel], dict[str, str]]] = [
        (DebitAccount, {"debit_id": "PST-1"}),
        (CreditAccount, {"credit_id": "PST-2"}),
        (RefundDebit, {}),
        (ReverseCredit, {}),
    ]
    for command, reply in replies:
        if command not in scripted_by_test:
            harness.stub("bank").on(command).succeed(reply)
    return harness


def _with_bank() -> tuple[SagaTestHarness, Bank]:
    bank = Bank.with_balances(OPENING, closed=frozenset({"ACC-CLOSED"}))
    bank.latency = 0
    harness = SagaTestHarness(transfer_saga)
    harness.add_participant(bank_participant(bank))
    return harness, bank


async def test_debits_the_source_before_crediting_the_destination() -> None:
    harness = _stubbed()

    saga = await harness.start(_transfer("ACC-ALICE", "ACC-BOB", "30.00"))

    assert saga.status is SagaStatus.COMPLETED
    assert harness.commands(saga.saga_id) == ["DebitAccount", "CreditAccount"]
    debit = harness.stub("bank").on(DebitAccount).received[0]
    credit = harness.stub("bank").on(CreditAccount).received[0]
    assert debit.payload["account_id"] == "ACC-ALICE"
    assert credit.payload["account_id"] == "ACC-BOB"


async def test_insufficient_funds_ends_the_transfer_with_nothing_to_undo() -> None:
    harness = _stubbed(DebitAccount)
    harness.stub("bank").on(DebitAccount).fail("insufficient_funds")

    saga = await harness.start(_transfer("ACC-ALICE", "ACC-BOB", "30.00"))

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.commands(saga.saga_id) == ["DebitAccount"]
    assert harness.compensations(saga.saga_id) == []


async def test_a_closed_destination_gets_the_debit_refunded() -> None:
    harness = _stubbed(CreditAccount)
    harness.stub("bank").on(CreditAccount).fail("account_closed")

    saga = await harness.start(_transfer("ACC-ALICE", "ACC-BOB", "30.00"))

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["RefundDebit"]


async def test_a_transient_bank_error_is_retried_until_the_debit_goes_through() -> None:
    harness = _stubbed(DebitAccount)
    harness.stub("bank").on(DebitAccount).fail("bank_unavailable", retryable=True, times=3)
    harness.stub("bank").on(DebitAccount).then_succeed({"debit_id": "PST-1"})

    saga = await harness.start(_transfer("ACC-ALICE", "ACC-BOB", "30.00"))
    await harness.advance(5)
    saga = await harness.saga(saga.saga_id)

    assert saga.status is SagaStatus.COMPLETED
    assert harness.commands(saga.saga_id) == ["DebitAccount"] * 4 + ["CreditAccount"]


async def test_a_credit_that_never_answers_is_reversed_and_the_debit_refunded() -> None:
    harness = _stubbed(CreditAccount)
    harness.stub("bank").on(CreditAccount).never_answer(times=10)

    saga = await harness.start(_transfer("ACC-ALICE", "ACC-BOB", "30.00"))
    await harness.advance(30)
    saga = await harness.saga(saga.saga_id)

    assert saga.status is SagaStatus.COMPENSATED
    assert harness.compensations(saga.saga_id) == ["ReverseCredit", "RefundDebit"]


@dataclass(frozen=True)
class Case:
    """One way a transfer between Alice, Bob and a closed account can end."""

    source: str
    destination: str
    amount: str
    status: SagaStatus
    alice_and_bob: tuple[str, str]
    outages: int = 0


CASES = {
    "completed": Case("ACC-ALICE", "ACC-BOB", "30.00", SagaStatus.COMPLETED, ("70.00", "50.00")),
    "insufficient-funds": Case(
        "ACC-BOB", "ACC-ALICE", "20.01", SagaStatus.COMPENSATED, ("100.00", "20.00")
    ),
    "destination-closed": Case(
        "ACC-ALICE", "ACC-CLOSED", "30.00", SagaStatus.COMPENSATED, ("100.00", "20.00")
    ),
    "transient-error-retried": Case(
        "ACC-ALICE", "ACC-BOB", "100.00", SagaStatus.COMPLETED, ("0.00", "120.00"), outages=2
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_balances_add_up_after_every_way_a_transfer_ends(case: Case) -> None:
    harness, bank = _with_bank()
    bank.inject_outage("TRF-0001", times=case.outages)
    opening_total = bank.total

    saga = await harness.start(_transfer(case.source, case.destination, case.amount))
    await harness.advance(5)
    saga = await harness.saga(saga.saga_id)

    assert saga.status is case.status
    assert bank.total == opening_total
    assert bank.lowest_balance >= 0
    alice, bob = bank.accounts["ACC-ALICE"].balance, bank.accounts["ACC-BOB"].balance
    assert (alice, bob) == tuple(Decimal(b) for b in case.alice_and_bob)


async def test_a_repeated_debit_with_the_same_idempotency_key_moves_money_once() -> None:
    bank = Bank.with_balances(OPENING)

    first = await bank.debit("TRF-0001", "ACC-ALICE", Decimal("40.00"), key="k-debit")
    again = await bank.debit("TRF-0001", "ACC-ALICE", Decimal("40.00"), key="k-debit")

    assert first == again
    assert bank.accounts["ACC-ALICE"].balance == Decimal("60.00")
    assert len(bank.postings) == 1


async def test_a_repeated_refund_puts_the_money_back_once() -> None:
    bank = Bank.with_balances(OPENING)
    await bank.debit("TRF-0001", "ACC-ALICE", Decimal("40.00"), key="k-debit")

    await bank.refund_debit("TRF-0001", key="k-refund")
    await bank.refund_debit("TRF-0001", key="k-refund-redelivered")

    assert bank.accounts["ACC-ALICE"].balance == Decimal("100.00")
    assert [p.kind for p in bank.postings] == ["debit", "refund"]


async def test_concurrent_debits_from_one_account_never_overdraw_it() -> None:
    bank = Bank.with_balances(OPENING)

    outcomes = await asyncio.gather(
        *(
            bank.debit(f"TRF-{i:04d}", "ACC-ALICE", Decimal("30.00"), key=f"k-{i}")
            for i in range(10)
        ),
        return_exceptions=True,
    )

    assert sum(1 for o in outcomes if isinstance(o, str)) == 3
    assert bank.accounts["ACC-ALICE"].balance == Decimal("10.00")
    assert bank.lowest_balance >= 0


def test_a_transfer_must_move_a_positive_amount_between_two_accounts() -> None:
    with pytest.raises(ValidationError):
        _transfer("ACC-ALICE", "ACC-BOB", "0.00")
    with pytest.raises(ValidationError):
        _transfer("ACC-ALICE", "ACC-ALICE", "1.00")
    with pytest.raises(ValidationError):
        _transfer("ACC-ALICE", "ACC-BOB", "1.001")


async def test_the_demo_keeps_the_books_balanced_through_a_concurrent_storm() -> None:
    report = await run_demo(storm=40)

    assert [r.scenario.transfer.transfer_id for r in report.named if not r.as_expected] == []
    assert all(r.as_expected for r in report.storm)
    assert report.bank.total == report.opening_total
    assert report.bank.lowest_balance >= 0
    assert any(r.status is SagaStatus.COMPLETED for r in report.storm)
    assert report.ok


def test_the_command_line_runs_the_demo_in_memory_and_exits_zero() -> None:
    assert main(["--memory", "--storm", "20"]) == 0
