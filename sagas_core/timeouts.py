"""The timeout service: turns passed deadlines into Timeout / RetryDue / SagaTimeout inputs."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sagas_core.clock import SystemClock
from sagas_core.outage import LoopFailures

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sagas_abstractions import SagaInstance
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

    With ``idle_interval`` the service polls when a deadline is due rather than all the time:
    it follows the deadlines its orchestrator commits and polls at each of them (no sooner than
    ``interval`` after the last poll), and otherwise every ``idle_interval``. Those idle polls
    find the deadlines this process did not commit: another worker's (one that stopped, once
    its claims' lease has passed) and those stored before this process started. An idle worker
    then asks the store once every ``idle_interval`` instead of every ``interval``. Following
    needs the system clock (a test's fake clock does not move by itself) and memory for one
    entry per saga with a deadline; past ``max_tracked`` sagas the service stops following and
    polls every ``interval`` again, as it does without ``idle_interval``.

    Args:
        orchestrator: Applies the inputs.
        interval: Seconds between polls when nothing is due (without ``idle_interval``), and
            at least between two polls (with it).
        batch_size: Deadlines handled per poll.
        owner: The name this service claims under (unique per instance by default).
        lease: Seconds a claim holds: a service killed while holding claims delays their
            deadlines by at most this. Default: 10 polls, at least 5 seconds.
        idle_interval: Follow the orchestrator's deadlines and poll at most this many seconds
            apart otherwise; ``None`` polls every ``interval``.
        max_tracked: Sagas whose deadlines are followed at most (see above).

    Raises:
        ValueError: ``idle_interval`` is shorter than ``interval``.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        interval: float = 0.1,
        batch_size: int = 100,
        owner: str | None = None,
        lease: float | None = None,
        idle_interval: float | None = None,
        max_tracked: int = 100_000,
    ) -> None:
        if idle_interval is not None and idle_interval < interval:
            raise ValueError(
                f"TimeoutService: idle_interval ({idle_interval} s) must not be shorter than "
                f"interval ({interval} s)"
            )
        self.orchestrator = orchestrator
        self.interval = interval
        self.idle_interval = idle_interval
        self.batch_size = batch_size
        self.max_tracked = max_tracked
        self.owner = owner or f"timeouts-{uuid.uuid4().hex}"
        self.lease = timedelta(
            seconds=lease if lease is not None else max(_MIN_LEASE, 10 * interval)
        )
        self.fired = 0
        self.polls = 0
        self._stopping = False
        self._wake = asyncio.Event()
        # Followed deadlines: the latest one committed per saga, and a heap of (deadline,
        # sequence, saga id) in which an entry whose deadline is no longer the saga's is stale
        # (skipped when it comes up, dropped when the heap is rebuilt).
        self._deadlines: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, int, str]] = []
        self._sequence = itertools.count()
        self._planned: datetime | None = None  # when the next poll is planned, while sleeping
        self.tracking = idle_interval is not None and isinstance(orchestrator.clock, SystemClock)
        if self.tracking:
            orchestrator.add_listener(self._committed)

    async def run_once(self) -> int:
        """Claim and fire what is due now; returns how many inputs were applied."""
        self.polls += 1
        fired = await self.orchestrator.fire_due(
            limit=self.batch_size, owner=self.owner, lease=self.lease
        )
        self.fired += fired
        return fired

    async def run(self) -> None:
        """Poll until :meth:`stop` is called (errors are logged, then retried)."""
        loop = asyncio.get_running_loop()
        failures = LoopFailures("timeout service", _log)
        while not self._stopping:
            self._wake.clear()  # before the round, so a stop() during it is not lost
            began = loop.time()
            polled_at = self.orchestrator.clock.now()
            sequence = next(self._sequence)
            try:
                fired = await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the loop must survive and retry
                failures.failed(exc)
                fired = 0
                sequence = -1  # nothing is known to be done: keep every followed deadline
            else:
                failures.succeeded()
            if fired >= self.batch_size:
                continue
            if not self.tracking:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                continue
            self._forget_done(polled_at, sequence)
            await self._sleep_until_due(loop, began)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current round."""
        self._stopping = True
        self._wake.set()

    # ------------------------------------------------------------------ following deadlines

    def _committed(self, instances: Sequence[SagaInstance]) -> None:
        """Commit listener: follow the next deadline of each committed saga."""
        if not self.tracking:
            return
        deadlines = self._deadlines
        for instance in instances:
            saga_id = instance.saga_id
            deadline = instance.next_deadline_at
            if deadline is None:
                deadlines.pop(saga_id, None)
                continue
            if deadlines.get(saga_id) == deadline:
                continue
            if saga_id not in deadlines and len(deadlines) >= self.max_tracked:
                self._stop_tracking()
                return
            deadlines[saga_id] = deadline
            heapq.heappush(self._heap, (deadline, next(self._sequence), saga_id))
            if self._planned is not None and deadline < self._planned:
                self._wake.set()  # due before the planned poll: plan again
        if len(self._heap) > 2 * len(deadlines) + 1024:
            self._heap = [(d, next(self._sequence), s) for s, d in deadlines.items()]
            heapq.heapify(self._heap)

    def _stop_tracking(self) -> None:
        _log.info(
            "timeout service follows %d sagas' deadlines, its limit: polling every %s s again",
            len(self._deadlines),
            self.interval,
        )
        self.tracking = False
        self._deadlines.clear()
        self._heap.clear()
        self._wake.set()

    def _forget_done(self, polled_at: datetime, sequence: int) -> None:
        """Drop the deadlines a complete poll at ``polled_at`` has taken care of.

        Only entries pushed before the poll began (``sequence``): a saga committed during the
        poll may be due at once and was not seen by it.
        """
        heap, deadlines = self._heap, self._deadlines
        while heap and heap[0][0] <= polled_at and heap[0][1] < sequence:
            deadline, _, saga_id = heapq.heappop(heap)
            if deadlines.get(saga_id) == deadline:
                del deadlines[saga_id]

    def _next_deadline(self) -> datetime | None:
        heap, deadlines = self._heap, self._deadlines
        while heap and deadlines.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the saga moved on
        return heap[0][0] if heap else None

    async def _sleep_until_due(self, loop: asyncio.AbstractEventLoop, began: float) -> None:
        """Sleep until the earliest followed deadline, ``idle_interval`` at most."""
        assert self.idle_interval is not None  # noqa: S101 - tracking implies it
        clock = self.orchestrator.clock
        try:
            while self.tracking and not self._stopping:
                now = clock.now()
                delay = self.idle_interval
                deadline = self._next_deadline()
                if deadline is not None:
                    delay = min(delay, (deadline - now).total_seconds())
                # Never sooner than ``interval`` after the last poll began.
                delay = max(delay, began + self.interval - loop.time())
                if delay <= 0:
                    return
                self._planned = now + timedelta(seconds=delay)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    return
        finally:
            self._planned = None
