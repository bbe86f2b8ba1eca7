"""The outbox relay: publishes committed messages with confirmation, then marks them sent.

Two ways in. The orchestrator of the same process hands over the records it just committed
(written already leased to this relay, see :class:`~sagas_abstractions.ports.OutboxHandoff`):
they are published at once, in batches, without a query. Everything else is claimed from the
outbox: records written without a lease, and the recovery path, records whose relay died
before publishing them (their lease passes, then any relay claims them). Published records are
marked sent in batches (one statement for many), while the next batch is being published.

A crash after publishing and before marking publishes the same message id again on restart;
receivers deduplicate it. Several relays (one per worker) share the outbox through leases. Each
saga's messages go out in order: records in hand are published in id order, and a saga whose
record failed to publish is held back until that record goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

from sagas_abstractions import OutboxRecord, SagaError, Unavailable
from sagas_core.outage import LoopFailures
from sagas_core.retry import ExponentialBackoff
from sagas_core.telemetry import Telemetry, messaging_system

if TYPE_CHECKING:
    from collections.abc import Sequence
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
        poll_interval: How long to sleep when idle and nobody kicks the relay; each idle poll
            claims (the recovery path).
        backoff: Delay before a record whose publish failed is tried again.
        telemetry: Publish spans and outbox metrics (the global providers when ``None``).
        sample_interval: Seconds between outbox size samples (a count query), when metrics
            are on.
        max_in_hand: At most this many records wait in memory to be published; while the
            relay holds that many, commits write their records unleased and the relay claims
            them from the outbox later, in batches (memory stays bounded when commits outpace
            the broker).
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
        max_in_hand: int = 1000,
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
        self.max_in_hand = max_in_hand
        self._system = messaging_system(bus)
        self._sampled_at = float("-inf")
        self._wake = asyncio.Event()
        self._stopping = False
        # Records in hand: handed over or claimed, and not yet marked sent or released. The
        # queue holds those still to publish, in id order per saga; the ids in _unmarked are
        # published and wait to be marked sent.
        self._queue: list[OutboxRecord] = []
        self._held: set[int] = set()
        self._unmarked: list[int] = []
        self._marking: asyncio.Task[None] | None = None
        self._claim = True  # claim on the next round: at start, after a kick, after idling
        self._claimed_at = time.monotonic()

    def kick(self) -> None:
        """Wake the relay to claim: a commit wrote records it was not handed."""
        self._claim = True
        self._wake.set()

    def hand_off(self, records: Sequence[OutboxRecord]) -> None:
        """Take records just committed already leased to :attr:`owner`; they go out next.

        Called by the orchestrator right after the commit (see
        :class:`~sagas_abstractions.ports.OutboxHandoff`). No claim query is needed for them.
        """
        for record in records:
            if record.id not in self._held:
                self._held.add(record.id)
                self._queue.append(record)
        if records:
            self._wake.set()

    @property
    def accepts_hand_off(self) -> bool:
        """Whether the relay takes more records in memory (see ``max_in_hand``)."""
        return len(self._queue) < self.max_in_hand

    @property
    def in_hand(self) -> int:
        """Records held by this relay: to publish, or published and not yet marked sent."""
        return len(self._held)

    async def run_once(self) -> int:
        """Publish the records in hand, or claim a batch and publish it, then mark them sent.

        Returns:
            How many records were published.
        """
        published = await self._round(claim=True)
        await self._mark_now()
        return published

    async def _round(self, *, claim: bool) -> int:
        """Publish one batch: the records in hand if any, else (if ``claim``) claimed ones."""
        now = self.clock.now()
        records = self._take()
        # Records in hand go first, but never for longer than a poll interval: a relay kept busy
        # by its own process's hand-offs must still claim what other processes wrote (sagas
        # started elsewhere) and what a dead relay held, or those would wait for a lull.
        if claim and (not records or self._claim_overdue()):
            self._queue[:0] = records  # back in hand, merged with the claimed ones in id order
            self._claim = False  # a kick from now on asks for another claim
            self._claimed_at = time.monotonic()
            claimed = await self.store.claim(
                owner=self.owner, limit=self.batch_size, lease=self.lease, now=now
            )
            if len(claimed) >= self.batch_size:
                self._claim = True  # more is likely waiting
            self._accept(claimed)
            records = self._take()
        if not records:
            if self.telemetry.metrics_enabled:
                await self._sample(records, now)
            return 0
        try:
            if self.telemetry.metrics_enabled:
                await self._sample(records, now)
            with self.telemetry.publishing(
                [record.envelope for record in records], system=self._system
            ) as envelopes:
                await self.bus.publish(envelopes)
        except SagaError as exc:
            if isinstance(exc, Unavailable):
                # The broker is away: one by one, every record would fail alike.
                self._queue[:0] = records
                raise
            await self._fall_back(records, exc)
            return 0
        except BaseException:
            # Not published (as far as we know): back to the front of the hand, in order, so
            # the next round tries them again (they stay leased to this relay).
            self._queue[:0] = records
            raise
        self._unmarked.extend(record.id for record in records)
        self.published += len(records)
        return len(records)

    def _claim_overdue(self) -> bool:
        return time.monotonic() - self._claimed_at >= self.poll_interval

    def _take(self) -> list[OutboxRecord]:
        batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        return batch

    def _accept(self, claimed: Sequence[OutboxRecord]) -> None:
        """Queue claimed records this relay does not hold already, keeping ids in order."""
        fresh = [record for record in claimed if record.id not in self._held]
        if not fresh:
            return
        self._held.update(record.id for record in fresh)
        self._queue.extend(fresh)
        self._queue.sort(key=lambda record: record.id)

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
        self._unmarked.extend(sent)
        self.published += len(sent)
        self.failures += len(failed)
        # Later records of a failed saga wait too: dropped from the hand, still leased to this
        # relay, they come back through a claim once the failed record has gone out.
        later = [record for record in self._queue if record.saga_id in failed_sagas]
        self._queue = [record for record in self._queue if record.saga_id not in failed_sagas]
        self._held.difference_update(record.id for record in later)
        try:
            if sent:
                await self._mark_now()
            for record in failed:
                delay = self.backoff.delay(record.attempts + 1, record.envelope.message_id)
                await self.store.release(
                    [record.id], retry_at=self.clock.now() + delay, error=str(exc)
                )
                self._held.discard(record.id)
        finally:
            # A failed record not released (the store failed) is still leased to this relay:
            # out of the hand, a claim brings it back.
            self._held.difference_update(record.id for record in failed)
        if later:
            self._claim = True

    async def _mark_now(self) -> None:
        """Mark every published record sent before returning (raises if the store fails)."""
        if self._marking is not None:
            with contextlib.suppress(Exception):
                await self._marking
        if self._unmarked:
            ids, self._unmarked = self._unmarked, []
            try:
                await self.store.mark_sent(ids, now=self.clock.now())
            except BaseException:
                self._unmarked[:0] = ids  # published: marking them is all that is left to do
                raise
            self._held.difference_update(ids)

    def _mark_soon(self) -> None:
        """Mark the published records sent in the background, many per statement."""
        if self._unmarked and (self._marking is None or self._marking.done()):
            self._marking = asyncio.create_task(self._mark_all(), name="sagas-outbox-mark-sent")

    async def _mark_all(self) -> None:
        failures = 0
        while self._unmarked:
            ids, self._unmarked = self._unmarked, []
            try:
                await self.store.mark_sent(ids, now=self.clock.now())
            except Exception:  # noqa: BLE001 - published already: keep them and try again
                self._unmarked[:0] = ids
                failures += 1
                _log.exception("marking %d outbox records sent failed", len(ids))
                if self._stopping:
                    return  # flush() tries once more
                await asyncio.sleep(self.backoff.delay(failures, self.owner).total_seconds())
                continue
            failures = 0
            self._held.difference_update(ids)

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
                await self._mark_now()
                while self._queue or await self.store.pending_count():
                    if not await self.run_once():
                        await asyncio.sleep(0.01)
        return await self.store.pending_count()

    async def run(self) -> None:
        """Publish until :meth:`stop` is called (errors are logged, then retried)."""
        failures = LoopFailures("outbox relay", _log)
        try:
            while not self._stopping:
                # Clear before the round, not after: a hand-off or kick during this round must
                # wake the next wait instead of being lost for a poll interval.
                self._wake.clear()
                try:
                    await self._round(claim=self._claim or self._claim_overdue())
                except Exception as exc:  # noqa: BLE001 - the loop must survive and retry
                    failures.failed(exc)
                    delay = self.backoff.delay(failures.count, self.owner).total_seconds()
                    await asyncio.sleep(delay)
                    continue
                failures.succeeded()
                self._mark_soon()
                if self._queue or self._claim:
                    continue  # more is in hand, or likely waiting
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                except TimeoutError:
                    self._claim = True  # idle: look for what nobody handed over (recovery)
        finally:
            if self._marking is not None:
                with contextlib.suppress(Exception):
                    await self._marking

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current round."""
        self._stopping = True
        self._wake.set()
