"""The timeout service: turns passed deadlines into Timeout / RetryDue / SagaTimeout inputs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagas_core.orchestrator import Orchestrator

__all__ = ["TimeoutService"]

_log = logging.getLogger("sagas.timeouts")

_MIN_LEASE = 5.0
"""The shortest default lease, in seconds."""


class TimeoutService:
    """Polls for due deadlines in small batches and feeds them to the orchestrator.

    Several workers can run it at once. Each service claims the due sagas it takes under its own
    owner name for a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, under the write lock on
    SQLite), so competing services handle disjoint batches instead of racing on the same sagas.
    The claim only spares wasted work: the orchestrator's optimistic versions are what make a
    deadline fire once (the loser of a race reloads and finds it no longer due), and when a
    worker dies holding claims, another takes those sagas over once the lease has passed.

    Args:
        orchestrator: Applies the inputs.
        interval: Seconds between polls when nothing is due.
        batch_size: Deadlines handled per poll.
        owner: The name this service claims under (unique per instance by default).
        lease: Seconds a claim holds: a service killed while holding claims delays their
            deadlines by at most this. Default: 10 polls, at least 5 seconds.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        interval: float = 0.1,
        batch_size: int = 100,
        owner: str | None = None,
        lease: float | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.interval = interval
        self.batch_size = batch_size
        self.owner = owner or f"timeouts-{uuid.uuid4().hex}"
        self.lease = timedelta(
            seconds=lease if lease is not None else max(_MIN_LEASE, 10 * interval)
        )
        self.fired = 0
        self._stopping = False
        self._wake = asyncio.Event()

    async def run_once(self) -> int:
        """Claim and fire what is due now; returns how many inputs were applied."""
        fired = await self.orchestrator.fire_due(
            limit=self.batch_size, owner=self.owner, lease=self.lease
        )
        self.fired += fired
        return fired

    async def run(self) -> None:
        """Poll until :meth:`stop` is called (errors are logged, then retried)."""
        while not self._stopping:
            self._wake.clear()  # before the round, so a stop() during it is not lost
            try:
                fired = await self.run_once()
            except Exception:  # noqa: BLE001 - the loop must survive and retry
                _log.exception("timeout service round failed")
                fired = 0
            if fired >= self.batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current round."""
        self._stopping = True
        self._wake.set()
