"""The trip-booking sample: flight -> hotel -> car -> payment -> confirmation, in < 200 lines.

Run it with ``python -m samples.trip_booking``.
"""

from samples.trip_booking.participants import Agency, build_participants
from samples.trip_booking.saga import TripData, trip_saga

__all__ = ["Agency", "TripData", "build_participants", "trip_saga"]
