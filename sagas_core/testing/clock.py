"""A clock that tests move by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~sagas_abstractions.Clock` that only moves when told to.

    Args:
        start: The initial time (aware); defaults to 2030-01-01T00:00:00Z.
    """

    def __init__(self, start: datetime | None = None) -> None:
        moment = start or datetime(2030, 1, 1, tzinfo=UTC)
        if moment.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._now = moment.astimezone(UTC)

    def now(self) -> datetime:
        """The current fake time."""
        return self._now

    def advance(self, by: timedelta | float) -> datetime:
        """Move time forward by ``by`` (a timedelta or seconds) and return the new time."""
        step = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if step < timedelta():
            raise ValueError("time only moves forward")
        self._now += step
        return self._now

    def set(self, moment: datetime) -> None:
        """Jump to ``moment`` (not earlier than now)."""
        if moment.astimezone(UTC) < self._now:
            raise ValueError("time only moves forward")
        self._now = moment.astimezone(UTC)
