"""A circuit breaker per participant destination.

After ``failure_threshold`` consecutive failures (timeouts, or failed replies the participant
marked retryable) the destination's circuit **opens** for ``open_for``: commands to it are not
sent and not failed either; the sagas that would send them wait (a stored retry deadline, no
attempt used) until the circuit may close. Then the circuit is **half-open**: one command goes
through as a probe while the others keep waiting a little; the probe's success closes the
circuit, its failure opens it again. A permanent (non-retryable) failed reply counts as a sign of
life: the participant answered.

The state lives in each worker process (like Polly or resilience4j breakers): workers learn about
a failing destination on their own, within ``failure_threshold`` failures each.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

__all__ = ["CircuitBreaker", "CircuitState", "CircuitStatus"]


class CircuitState(StrEnum):
    """State of one destination's circuit."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitStatus:
    """The breaker's view of one destination (for status pages and metrics).

    Attributes:
        state: Closed, open or half-open.
        consecutive_failures: Failures since the last success.
        open_until: When an open circuit lets a probe through.
        probe_in_flight: Whether a half-open circuit's probe is out.
    """

    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    open_until: datetime | None = None
    probe_in_flight: bool = False


class CircuitBreaker:
    """Tracks destinations' health and says which ones are blocked, and until when.

    Args:
        failure_threshold: Consecutive failures that open a circuit.
        open_for: How long a circuit stays open before a probe may go through.
        probe_wait: How long other commands wait while a probe is out.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_for: timedelta = timedelta(seconds=30),
        probe_wait: timedelta = timedelta(seconds=1),
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if open_for <= timedelta() or probe_wait <= timedelta():
            raise ValueError("open_for and probe_wait must be positive")
        self.failure_threshold = failure_threshold
        self.open_for = open_for
        self.probe_wait = probe_wait
        self._circuits: dict[str, CircuitStatus] = {}

    def status(self, destination: str) -> CircuitStatus:
        """The circuit of ``destination`` (closed if never seen)."""
        return self._circuits.get(destination) or CircuitStatus()

    def statuses(self) -> dict[str, CircuitStatus]:
        """Every destination seen so far."""
        return dict(self._circuits)

    def blocked(self, now: datetime) -> dict[str, datetime]:
        """Destinations commands must not be sent to now, each with when to try again."""
        blocked: dict[str, datetime] = {}
        for destination, circuit in self._circuits.items():
            if circuit.state is CircuitState.OPEN:
                assert circuit.open_until is not None  # noqa: S101 - set whenever it opens
                if now < circuit.open_until:
                    blocked[destination] = circuit.open_until
                    continue
                circuit.state = CircuitState.HALF_OPEN
                circuit.probe_in_flight = False
            if circuit.state is CircuitState.HALF_OPEN and circuit.probe_in_flight:
                blocked[destination] = now + self.probe_wait
        return blocked

    def record_sent(self, destination: str) -> None:
        """A command went out: in a half-open circuit, it is the probe."""
        circuit = self._circuits.get(destination)
        if circuit is not None and circuit.state is CircuitState.HALF_OPEN:
            circuit.probe_in_flight = True

    def record_success(self, destination: str) -> None:
        """The destination answered: close its circuit."""
        circuit = self._circuits.get(destination)
        if circuit is not None:
            circuit.state = CircuitState.CLOSED
            circuit.consecutive_failures = 0
            circuit.open_until = None
            circuit.probe_in_flight = False

    def record_failure(self, destination: str, now: datetime) -> None:
        """The destination timed out or failed transiently: count it, open when over the limit."""
        circuit = self._circuits.setdefault(destination, CircuitStatus())
        circuit.consecutive_failures += 1
        if (
            circuit.state is CircuitState.HALF_OPEN
            or circuit.consecutive_failures >= self.failure_threshold
        ):
            circuit.state = CircuitState.OPEN
            circuit.open_until = now + self.open_for
            circuit.probe_in_flight = False
