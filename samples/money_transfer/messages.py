"""Domain types, saga data and the commands/replies of the money-transfer saga."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Self

from pydantic import BaseModel, Field, model_validator

Money = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=2)]
"""An amount of money: never negative, two decimals."""

AccountId = Annotated[str, Field(pattern=r"^ACC-[A-Z0-9]{2,20}$")]
"""An account number, ``ACC-ALICE``."""

TransferId = Annotated[str, Field(pattern=r"^TRF-[0-9]{4,10}$")]
"""A transfer reference, ``TRF-0001``."""


class TransferData(BaseModel):
    """The saga data: who pays whom how much, plus the postings each step made."""

    transfer_id: TransferId
    source_account: AccountId
    destination_account: AccountId
    amount: Money = Field(gt=0)
    debit_id: str | None = None
    credit_id: str | None = None

    @model_validator(mode="after")
    def _two_different_accounts(self) -> Self:
        if self.source_account == self.destination_account:
            raise ValueError("source and destination must be different accounts")
        return self


class DebitAccount(BaseModel):
    """Take ``amount`` out of the source account."""

    transfer_id: TransferId
    account_id: AccountId
    amount: Money


class Debited(BaseModel):
    """The source account was debited."""

    debit_id: str


class RefundDebit(BaseModel):
    """Compensation: put the transfer's debit back (found by transfer id if the reply was lost)."""

    transfer_id: TransferId


class CreditAccount(BaseModel):
    """Pay ``amount`` into the destination account."""

    transfer_id: TransferId
    account_id: AccountId
    amount: Money


class Credited(BaseModel):
    """The destination account was credited."""

    credit_id: str


class ReverseCredit(BaseModel):
    """Compensation: take back a credit that may have landed although its reply never came."""

    transfer_id: TransferId
