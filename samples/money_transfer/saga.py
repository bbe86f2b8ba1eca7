"""The money-transfer saga: debit the source account -> credit the destination account."""

from __future__ import annotations

from sagas_core import SagaBuilder, exponential
from samples.money_transfer.messages import (
    CreditAccount,
    Credited,
    DebitAccount,
    Debited,
    RefundDebit,
    ReverseCredit,
    TransferData,
)

transfer_saga = (
    SagaBuilder("money-transfer", data=TransferData)
    .step("debit-source")
    .send(DebitAccount, to="bank", map={"account_id": "source_account"}, reply=Debited)
    .compensate_with(RefundDebit)
    .timeout(seconds=2)
    # A core-banking outage answers "retry later": five tries ride out a short one.
    .retry(attempts=5, backoff=exponential(0.02, max=0.2))
    .step("credit-destination")
    .send(CreditAccount, to="bank", map={"account_id": "destination_account"}, reply=Credited)
    # Only runs when the credit's outcome is unknown (timed out): it may have landed.
    .compensate_with(ReverseCredit)
    .timeout(seconds=2)
    .retry(attempts=5, backoff=exponential(0.02, max=0.2))
    .saga_timeout(minutes=5)
    .build()
)
"""The money-transfer saga definition."""
