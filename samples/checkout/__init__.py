"""The checkout sample: PlaceOrder -> ProcessPayment -> ReserveInventory.

Run it with ``python -m samples.checkout``.
"""

from samples.checkout.messages import CartItem, CheckoutData
from samples.checkout.saga import checkout_saga

__all__ = ["CartItem", "CheckoutData", "checkout_saga"]
