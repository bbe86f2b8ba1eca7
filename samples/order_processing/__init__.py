"""The order-processing sample: ReserveInventory -> ProcessPayment -> CreateShipment.

Run it with ``python -m samples.order_processing``.
"""

from samples.order_processing.messages import OrderData, OrderLine
from samples.order_processing.saga import order_saga

__all__ = ["OrderData", "OrderLine", "order_saga"]
