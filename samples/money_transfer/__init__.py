"""The money-transfer sample: debit the source account, then credit the destination.

Run it with ``python -m samples.money_transfer``.
"""

from samples.money_transfer.messages import TransferData
from samples.money_transfer.saga import transfer_saga

__all__ = ["TransferData", "transfer_saga"]
