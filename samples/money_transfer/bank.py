"""The bank: accounts and postings in memory, and the ``bank`` participant serving them.

Failure modes:

* a debit larger than the balance fails with ``insufficient_funds`` (permanent; nothing moved);
* a closed account refuses postings with ``account_closed`` (permanent);
* :meth:`Bank.inject_outage` makes the next postings of one transfer fail with
  ``bank_unavailable``, a :class:`~sagas_abstractions.RetryableError` the saga retries.

Every posting is keyed on the command's idempotency key (:class:`~sagas_core.CommandContext`): a
redelivered or retried command finds the posting it already made and returns it, so money never
moves twice. Each account has a lock, held from the balance check to the update, so concurrent
transfers from one account can never overdraw it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from sagas_abstractions import ParticipantError, RetryableError
from sagas_core import CommandContext, Participant
from samples.money_transfer.messages import (
    CreditAccount,
    Credited,
    DebitAccount,
    Debited,
    RefundDebit,
    ReverseCredit,
)

ZERO = Decimal("0.00")


@dataclass
class Account:
    """One account: its balance, whether it is open, and the lowest balance it ever had."""

    account_id: str
    balance: Decimal
    is_open: bool = True
    lowest: Decimal = field(init=False)

    def __post_init__(self) -> None:
        self.lowest = self.balance


@dataclass(frozen=True)
class Posting:
    """One movement of money on one account (negative: money out)."""

    posting_id: str
    transfer_id: str
    account_id: str
    amount: Decimal
    kind: str
    key: str


@dataclass
class Bank:
    """Accounts and the postings that moved money between them.

    Args:
        accounts: The accounts, by id.
        latency: Seconds the core system takes per posting; it is spent inside the account
            lock, between the balance check and the update, where a missing lock would let two
            concurrent debits both pass the check.
    """

    accounts: dict[str, Account]
    latency: float = 0.002
    postings: list[Posting] = field(default_factory=list)
    _by_key: dict[str, Posting] = field(default_factory=dict)
    _by_transfer: dict[tuple[str, str], Posting] = field(default_factory=dict)
    _outages: dict[str, int] = field(default_factory=dict)
    _locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def with_balances(
        cls, balances: dict[str, str], *, closed: frozenset[str] = frozenset()
    ) -> Bank:
        """A bank holding ``balances`` (account id -> amount), with ``closed`` accounts closed."""
        return cls(
            {
                account_id: Account(account_id, Decimal(amount), is_open=account_id not in closed)
                for account_id, amount in balances.items()
            }
        )

    def inject_outage(self, transfer_id: str, *, times: int = 1) -> None:
        """Make the next ``times`` postings of a transfer fail as retryable ``bank_unavailable``."""
        self._outages[transfer_id] = times

    @property
    def total(self) -> Decimal:
        """The sum of every balance: transfers move money, they never make or lose it."""
        return sum((a.balance for a in self.accounts.values()), start=ZERO)

    @property
    def lowest_balance(self) -> Decimal:
        """The lowest balance any account ever had."""
        return min((a.lowest for a in self.accounts.values()), default=ZERO)

    def balances(self) -> dict[str, Decimal]:
        """Every account's current balance."""
        return {account_id: a.balance for account_id, a in self.accounts.items()}

    def _account(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            raise ParticipantError(f"no account {account_id}", code="unknown_account")
        if not account.is_open:
            raise ParticipantError(f"account {account_id} is closed", code="account_closed")
        return account

    def _check_outage(self, transfer_id: str) -> None:
        left = self._outages.get(transfer_id, 0)
        if left > 0:
            self._outages[transfer_id] = left - 1
            raise RetryableError("core banking system unavailable", code="bank_unavailable")

    async def _post(
        self, transfer_id: str, account_id: str, amount: Decimal, kind: str, key: str
    ) -> Posting:
        async with self._locks[account_id]:
            done = self._by_key.get(key)
            if done is not None:
                return done  # posted already: the reply was lost, or this is a retry
            self._check_outage(transfer_id)
            account = self._account(account_id)
            if account.balance + amount < 0:
                raise ParticipantError(
                    f"{account_id} holds {account.balance}, {-amount} needed",
                    code="insufficient_funds",
                )
            await asyncio.sleep(self.latency)
            account.balance += amount
            account.lowest = min(account.lowest, account.balance)
            posting = Posting(
                f"PST-{next(self._ids):05d}", transfer_id, account_id, amount, kind, key
            )
            self.postings.append(posting)
            self._by_key[key] = posting
            self._by_transfer[transfer_id, kind] = posting
            return posting

    async def debit(self, transfer_id: str, account_id: str, amount: Decimal, key: str) -> str:
        """Take money out of an account; returns the posting id."""
        return (await self._post(transfer_id, account_id, -amount, "debit", key)).posting_id

    async def credit(self, transfer_id: str, account_id: str, amount: Decimal, key: str) -> str:
        """Pay money into an account; returns the posting id."""
        return (await self._post(transfer_id, account_id, amount, "credit", key)).posting_id

    async def _undo(self, transfer_id: str, kind: str, undo: str, key: str) -> None:
        original = self._by_transfer.get((transfer_id, kind))
        if original is None:
            return  # never posted: nothing to undo
        account = self.accounts[original.account_id]
        async with self._locks[account.account_id]:
            if (transfer_id, undo) in self._by_transfer:
                return  # undone already (a redelivered compensation)
            if account.balance - original.amount < 0:
                raise ParticipantError(
                    f"{account.account_id} no longer holds {original.amount}",
                    code="reversal_blocked",
                )
            account.balance -= original.amount
            account.lowest = min(account.lowest, account.balance)
            posting = Posting(
                f"PST-{next(self._ids):05d}",
                transfer_id,
                account.account_id,
                -original.amount,
                undo,
                key,
            )
            self.postings.append(posting)
            self._by_key[key] = posting
            self._by_transfer[transfer_id, undo] = posting

    async def refund_debit(self, transfer_id: str, key: str) -> None:
        """Put a transfer's debit back on its account (closed or not: it is the owner's money)."""
        await self._undo(transfer_id, "debit", "refund", key)

    async def reverse_credit(self, transfer_id: str, key: str) -> None:
        """Take back a transfer's credit, if it landed."""
        await self._undo(transfer_id, "credit", "reversal", key)


def bank_participant(bank: Bank) -> Participant:
    """The ``bank`` participant, serving ``bank``."""
    participant = Participant("bank").provide(Bank, bank)

    @participant.handles(DebitAccount)
    async def debit(cmd: DebitAccount, ledger: Bank, context: CommandContext) -> Debited:
        posting = await ledger.debit(
            cmd.transfer_id, cmd.account_id, cmd.amount, context.idempotency_key
        )
        return Debited(debit_id=posting)

    @participant.handles(CreditAccount)
    async def credit(cmd: CreditAccount, ledger: Bank, context: CommandContext) -> Credited:
        posting = await ledger.credit(
            cmd.transfer_id, cmd.account_id, cmd.amount, context.idempotency_key
        )
        return Credited(credit_id=posting)

    @participant.handles(RefundDebit)
    async def refund(cmd: RefundDebit, ledger: Bank, context: CommandContext) -> None:
        await ledger.refund_debit(cmd.transfer_id, context.idempotency_key)

    @participant.handles(ReverseCredit)
    async def reverse(cmd: ReverseCredit, ledger: Bank, context: CommandContext) -> None:
        await ledger.reverse_credit(cmd.transfer_id, context.idempotency_key)

    return participant
