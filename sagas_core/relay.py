"""The outbox relay: publishes committed messages with confirmation, then marks them sent.

A crash after publishing and before marking publishes the same message id again on restart;
receivers deduplicate it. Several relays (one per worker) share the outbox through leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

from sagas_abstractions import OutboxRecord, SagaError
from sagas_core.retry import ExponentialBackoff
from sagas_core.telemetry import Telemetry, messaging_system

if TYPE_CHECKING:
    from datetime import datetime

    from sagas_abstractions import Clock, MessageBus, OutboxStore

__all__ = ["OutboxRelay"]

_log = logging.getLogger("sagas.relay")


class OutboxRelay:
    """Moves outbox records to the bus.

    Args:
        store: The outbox.
        bus: Where to publish.
        clock: The source of time.
        owner: This relay's lease owner name (unique per process).
        batch_size: Records claimed and published per round.
        lease: How long a claim keeps other relays away (crash recovery delay).
        poll_interval: How long to sleep when idle and nobody kicks the relay.
        backoff: Delay before a record whose publish failed is tried again.
        telemetry: Publish spans and outbox metrics (the global providers when ``None``).
        sample_interval: Seconds between outbox size samples (a count query), when metrics
            are on.
    """

    def __init__(
        self,
        *,
        store: OutboxStore,
        bus: MessageBus,
        clock: Clock,
        owner: str | None = None,
        batch_size: int = 100,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: float = 0.5,
        backoff: ExponentialBackoff | None = None,
        telemetry: Telemetry | None = None,
        sample_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.owner = owner or f"relay-{uuid.uuid4().hex[:12]}"
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.backoff = backoff or ExponentialBackoff(initial=0.1, maximum=10.0)
        self.published = 0
        self.failures = 0
        self.telemetry = telemetry or Telemetry.default()
        self.sample_interval = sample_interval
        self._system = messaging_system(bus)
        self._sampled_at = float("-inf")
        self._wake = asyncio.Event()
        self._stopping = False

    def kick(self) -> None:
        """Wake the relay now (called after a commit wrote outbox records)."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim one batch and publish it; returns how many records were published."""
        now = self.clock.now()
        records = await self.store.claim(
            owner=self.owner, limit=self.batch_size, lease=self.lease, now=now
        )
        if self.telemetry.metrics_enabled:
            await self._sample(records, now)
        if not records:
            return 0
        try:
            with self.telemetry.publishing(
                [record.envelope for record in records], system=self._system
            ) as envelopes:
                await self.bus.publish(envelopes)
        except SagaError as exc:
            await self._fall_back(records, exc)
            return 0
        await self.store.mark_sent([record.id for record in records], now=self.clock.now())
        self.published += len(records)
        return len(records)

    async def _fall_back(self, records: list[OutboxRecord], exc: SagaError) -> None:
        """The batch failed: publish record by record, in order, to save what can be saved."""
        _log.warning("outbox batch of %d failed (%s); publishing one by one", len(records), exc)
        failed_sagas: set[str] = set()
        sent: list[int] = []
        failed: list[OutboxRecord] = []
        for record in records:
            if record.saga_id in failed_sagas:
                failed.append(record)  # keep each saga's messages in order
                continue
            try:
                with self.telemetry.publishing([record.envelope], system=self._system) as one:
                    await self.bus.publish(one)
            except SagaError as error:
                _log.warning("publishing %s failed: %s", record.envelope.message_id, error)
                failed_sagas.add(record.saga_id)
                failed.append(record)
            else:
                sent.append(record.id)
        if sent:
            await self.store.mark_sent(sent, now=self.clock.now())
            self.published += len(sent)
        self.failures += len(failed)
        for record in failed:
            delay = self.backoff.delay(record.attempts + 1, record.envelope.message_id)
            await self.store.release([record.id], retry_at=self.clock.now() + delay, error=str(exc))

    async def _sample(self, records: list[OutboxRecord], now: datetime) -> None:
        """Outbox metrics: the lag of this round's oldest record, the size now and then."""
        oldest = min((record.created_at for record in records), default=None)
        lag = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        self.telemetry.record_outbox(self.owner, lag=lag)
        if time.monotonic() - self._sampled_at >= self.sample_interval:
            self._sampled_at = time.monotonic()
            self.telemetry.record_outbox(self.owner, size=await self.store.pending_count())

    async def flush(self, *, timeout: float = 10.0) -> int:
        """Publish until the outbox is empty or ``timeout`` passes; returns what remains."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while await self.store.pending_count():
                    if not await self.run_once():
                        await asyncio.sleep(0.01)
        return await self.store.pending_count()

    async def run(self) -> None:
        """Publish until :meth:`stop` is called (errors are logged, then retried)."""
        failures = 0
        while not self._stopping:
            # Clear before claiming, not after: a kick for a commit made while this round was
            # claiming must wake the next wait instead of being lost for a poll interval.
            self._wake.clear()
            try:
                published = await self.run_once()
                failures = 0
            except Exception:  # noqa: BLE001 - the loop must survive and retry
                failures += 1
                _log.exception("outbox relay round failed")
                await asyncio.sleep(self.backoff.delay(failures, self.owner).total_seconds())
                continue
            if published >= self.batch_size:
                continue  # more is likely waiting
            # A short batch took all there was: wait for the next kick (a commit during this
            # round has already set it) instead of claiming again for nothing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current round."""
        self._stopping = True
        self._wake.set()
