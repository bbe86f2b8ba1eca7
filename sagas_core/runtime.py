"""The embedded runtime: orchestrator, relay, timeouts and participants in one process.

It runs over any store and bus, in memory by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sagas_abstractions import (
    Envelope,
    RouteKind,
    SagaInstance,
    SagaNotFound,
    SagaStatus,
    Subscription,
)
from sagas_core.builder import local_destination
from sagas_core.clock import SystemClock
from sagas_core.codec import dead_lettered
from sagas_core.di import Dependencies, Resolver, ScopedResolver
from sagas_core.events import event_envelope
from sagas_core.memory.bus import InMemoryBus
from sagas_core.memory.store import InMemorySagaStore
from sagas_core.orchestrator import (
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Orchestrator,
    OrphanReplyPolicy,
    StatusEvents,
)
from sagas_core.participant import InMemoryIdempotencyStore, Participant
from sagas_core.relay import OutboxRelay
from sagas_core.telemetry import Telemetry, messaging_system
from sagas_core.timeouts import TimeoutService

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable, Mapping
    from types import TracebackType

    from pydantic import BaseModel

    from sagas_abstractions import Clock, MessageBus, SagaRepository
    from sagas_core.circuit import CircuitBreaker
    from sagas_core.definition import SagaDefinition

__all__ = ["SagaRuntime", "run_event_loop", "tune_gc"]

_log = logging.getLogger("sagas.runtime")

# How long stop() lets the flush count what is left after its own timeout (one store query).
_COUNT_SECONDS = 5.0


async def _finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
    """Let ``tasks`` end within ``grace`` seconds, then cancel the rest; log, never raise."""
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            _log.error("background task %s had failed", task.get_name(), exc_info=task.exception())
    if not pending:
        return
    _log.warning(
        "background task(s) %s did not stop within %gs; cancelled",
        ", ".join(sorted(task.get_name() for task in pending)),
        grace,
    )
    for task in pending:
        task.cancel()
    await asyncio.wait(pending, timeout=_COUNT_SECONDS)


T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to the end like :func:`asyncio.run`, on uvloop when it is installed.

    uvloop (``pip install 'sagas-orchestrator[fast]'``) runs the same asyncio code with a
    faster event loop; the event loop is a good part of a worker's CPU per message. Without
    it, asyncio's own loop is used. ``sagas worker`` runs on this.
    """
    try:
        import uvloop  # noqa: PLC0415 - optional: the fast extra
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def tune_gc(young: int = 10_000) -> None:
    """Tune Python's cyclic garbage collector for a long-running worker process.

    Call it once, after start-up (``sagas worker`` and ``sagas participant`` do). Every object
    alive then (modules, saga definitions, the models' validators) is moved out of the
    collector's sight (:func:`gc.freeze`), so a full collection scans only what the process
    made since; and the youngest generation is collected every ``young`` allocations net
    instead of every 700, so a message's short-lived objects are mostly freed by reference
    counting before a collection walks them. It changes when cycles are collected, not
    whether: memory held by cyclic garbage grows by at most ``young`` objects. What it saves
    per step: docs/performance.md, "Figures behind the code".
    """
    if young < 1:
        raise ValueError(f"young must be >= 1, got {young}")
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


LOCAL_STEP_OUTCOMES = 10_000
"""Local-step outcomes a worker remembers to answer a redelivered local command at once.

Bounded well below the participant default so that a worker's memory stays flat however many
sagas it runs (docs/performance.md, "Memory soak"). A duplicate comes while its step is in
flight, within seconds; one that comes after its outcome was forgotten runs the step again,
which local steps tolerate already (at-least-once, docs/concepts/steps.md).
"""


class SagaRuntime:
    """Runs sagas in this process: start it, start sagas, stop it.

    Local steps are served by participants the runtime creates itself, over the same bus, so
    they are exactly as durable as remote steps.

    Args:
        sagas: The saga definitions to run.
        participants: Participants to host in this process too (optional).
        store: The state backend; in memory by default.
        bus: The message bus; in memory by default.
        clock: The source of time.
        dependencies: Supplies local step parameters by type (shared with the participants the
            runtime creates for local steps; a scoped resolver gives each command its scope).
        group: The orchestrator group (names the reply queue).
        concurrency: Replies handled at once.
        timeout_interval: Seconds between deadline polls (at least, with
            ``timeout_idle_interval``).
        timeout_idle_interval: Poll for deadlines when one this process committed is due,
            and otherwise every this many seconds (deadlines committed elsewhere: another
            worker's, once its claims' lease has passed, or a previous run's); ``None`` polls
            every ``timeout_interval``. See :class:`~sagas_core.timeouts.TimeoutService`.
        relay_poll_interval: Seconds between outbox polls when idle and not kicked. The
            records this process commits need no poll: they are handed to its relay at once.
        relay_lease: Seconds an outbox claim keeps other relays away: after a crash, what the
            dead process had claimed (or committed and not yet published) goes out again this
            long after (an in-process bus publishes at once, so a few seconds are plenty there).
        orphan_replies: What to do with replies for sagas that do not exist.
        breaker: Defers commands to destinations that keep failing (see ``sagas_core.circuit``).
        telemetry: Spans and metrics for the orchestrator, relay and participants that have
            none of their own (:meth:`Telemetry.default`, the global providers, when ``None``).
        telemetry_interval: Seconds between samples of the oldest active saga's age (a cheap
            store query, only while metrics are on).
        instance_cache: How many active sagas the orchestrator keeps as it saved them last,
            so their next input is decided without a load (see :class:`Orchestrator`); memory
            stays bounded by it however many sagas are in flight. 0 turns it off.
        status_events: Which status events go to the saga-events topic.
        max_message_bytes: The largest reply or event body the orchestrator parses (a larger
            one is dead-lettered unparsed); ``None``: no limit.
        max_data_bytes: The most a saga's data, and one reply's data, may take as JSON (a
            reply that would pass it fails its step); ``None``: no limit.
        reply_users: The broker user of each destination's participant: replies for its steps
            must carry that validated AMQP ``user_id`` (see :class:`Orchestrator`).

    Example:
        ```python
        async with SagaRuntime(sagas=[order_saga], participants=[inventory]) as runtime:
            saga = await runtime.start_saga("order-processing", OrderData(...))
            done = await runtime.wait_for(saga.saga_id)
        ```
    """

    def __init__(
        self,
        *,
        sagas: Iterable[SagaDefinition],
        participants: Iterable[Participant] = (),
        store: SagaRepository | None = None,
        bus: MessageBus | None = None,
        clock: Clock | None = None,
        dependencies: Resolver | ScopedResolver | None = None,
        group: str = "default",
        concurrency: int = 16,
        timeout_interval: float = 0.05,
        timeout_idle_interval: float | None = 1.0,
        relay_poll_interval: float = 0.5,
        relay_lease: float = 10.0,
        orphan_replies: OrphanReplyPolicy = OrphanReplyPolicy.LOG,
        breaker: CircuitBreaker | None = None,
        telemetry: Telemetry | None = None,
        telemetry_interval: float = 15.0,
        instance_cache: int = 2048,
        status_events: StatusEvents | str = StatusEvents.ALL,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        max_data_bytes: int | None = DEFAULT_MAX_DATA_BYTES,
        reply_users: Mapping[str, str] | None = None,
    ) -> None:
        self.definitions = tuple(sagas)
        self.participants = list(participants)
        self.store: SagaRepository = store if store is not None else InMemorySagaStore()
        self._owns_bus = bus is None
        self.bus: MessageBus = bus if bus is not None else InMemoryBus(keep_published=10_000)
        self.clock = clock or SystemClock()
        self.dependencies: Resolver | ScopedResolver = (
            dependencies if dependencies is not None else Dependencies()
        )
        self.concurrency = concurrency
        self.telemetry = telemetry or Telemetry.default()
        self.telemetry_interval = telemetry_interval
        self.orchestrator = Orchestrator(
            store=self.store,
            definitions=self.definitions,
            clock=self.clock,
            group=group,
            orphan_replies=orphan_replies,
            breaker=breaker,
            telemetry=self.telemetry,
            instance_cache=instance_cache,
            status_events=status_events,
            max_message_bytes=max_message_bytes,
            max_data_bytes=max_data_bytes,
            reply_users=reply_users,
        )
        self.orchestrator.messaging_system = messaging_system(self.bus)
        self.relay = OutboxRelay(
            store=self.store,
            bus=self.bus,
            clock=self.clock,
            # An in-process bus reaches this process only, so one relay per store can use it:
            # a fixed name lets a restarted process take over what its predecessor held at once
            # instead of after the lease.
            owner=f"relay-in-process-{group}" if self._owns_bus else None,
            poll_interval=relay_poll_interval,
            lease=timedelta(seconds=relay_lease),
            telemetry=self.telemetry,
        )
        self.timeouts = TimeoutService(
            self.orchestrator, interval=timeout_interval, idle_interval=timeout_idle_interval
        )
        self.orchestrator.use_relay(self.relay)
        watch = getattr(self.store, "watch_slow_statements", None)
        if callable(watch):  # the SQL store reports its slow claims and saves
            watch(self.telemetry.record_slow_statement)
        self._subscriptions: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._running = False
        self.participants.extend(self._local_participants())
        if telemetry is not None:
            for participant in self.participants:
                if participant.telemetry is Telemetry.default():
                    participant.telemetry = telemetry

    def _local_participants(self) -> list[Participant]:
        hosted = []
        for definition in self.definitions:
            local = definition.local_steps
            if not local:
                continue
            participant = Participant(
                local_destination(definition.name),
                dependencies=self.dependencies,
                idempotency=InMemoryIdempotencyStore(capacity=LOCAL_STEP_OUTCOMES),
                clock=self.clock,
                telemetry=self.telemetry,
                warn_in_memory=False,
            )
            for _, _, spec in local:
                assert spec.handler is not None  # noqa: S101 - local specs always have one
                participant.register(spec.command_type, definition.data_model, spec.handler)
            hosted.append(participant)
        return hosted

    @property
    def running(self) -> bool:
        """Whether the runtime is started."""
        return self._running

    async def start(self) -> None:
        """Subscribe to replies, attach participants, start the relay and the timeout service."""
        if self._running:
            return
        self._stopped.clear()
        self._subscriptions.append(
            await self.bus.subscribe(
                RouteKind.REPLY,
                self.orchestrator.reply_to,
                self._on_reply,
                concurrency=self.concurrency,
            )
        )
        for topic in self.orchestrator.event_topics:
            self._subscriptions.append(
                await self.bus.subscribe(
                    RouteKind.EVENT, topic, self._on_event, concurrency=self.concurrency
                )
            )
        for participant in self.participants:
            self._subscriptions.append(
                await participant.attach(self.bus, concurrency=self.concurrency)
            )
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="sagas-outbox-relay"),
            asyncio.create_task(self.timeouts.run(), name="sagas-timeouts"),
            asyncio.create_task(self._sample_ages(), name="sagas-telemetry"),
        ]
        self._running = True

    async def _sample_ages(self) -> None:
        """Sample the age in its state of the stalest active saga (``saga.oldest_active.age``)."""
        while not self._stopped.is_set():
            if self.telemetry.metrics_enabled:
                try:
                    for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
                        # find() returns the least recently updated first: one row is enough.
                        stalest = await self.store.find(status=status, limit=1)
                        age = (
                            (self.clock.now() - stalest[0].updated_at).total_seconds()
                            if stalest
                            else 0.0
                        )
                        self.telemetry.record_oldest(status, max(0.0, age))
                except Exception:  # noqa: BLE001 - a metric sample must never stop the worker
                    _log.exception("sampling the oldest active saga failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.telemetry_interval)

    async def _on_reply(self, envelope: Envelope) -> None:
        try:
            await self.orchestrator.handle_envelope(envelope)
        except SagaNotFound:
            # Orphan policy "dead-letter": park the reply for a human, then ack it.
            await self.bus.publish(
                [dead_lettered(envelope, "reply for a saga that does not exist")]
            )

    async def _on_event(self, envelope: Envelope) -> None:
        outcome = await self.orchestrator.handle_event(envelope)
        if outcome.dead_letter:
            # Park the event for a human, then ack it: it can never succeed as it is.
            await self.bus.publish([dead_lettered(envelope, "; ".join(outcome.dead_letter))])

    async def publish_event(
        self,
        event: BaseModel,
        *,
        message_id: str,
        topic: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Publish a domain event on this runtime's bus (see ``event_envelope``).

        Services usually publish their own events; this is for in-process publishers and tests.
        """
        await self.bus.publish(
            [
                event_envelope(
                    event,
                    message_id=message_id,
                    topic=topic,
                    correlation_id=correlation_id,
                    at=self.clock.now(),
                )
            ]
        )

    async def stop(self, *, grace: float = 10.0) -> None:
        """Stop consuming, let in-flight work finish, flush the outbox (bounded), stop tasks.

        A stuck or failing dependency (a broker that stopped confirming, a database that does
        not answer) does not make this raise: the background tasks get ``grace`` seconds and are
        then cancelled, the flush gets ``grace`` more, and what is left unpublished is logged.
        It is safe in the outbox and goes out on the next start.
        """
        if not self._running:
            return
        self._running = False
        for subscription in reversed(self._subscriptions):
            await subscription.close()
        self._subscriptions.clear()
        self.timeouts.stop()
        self.relay.stop()
        self._stopped.set()
        await _finish(self._tasks, grace)
        self._tasks.clear()
        # The relay's loop has ended: flushing now cannot race it for the same records.
        try:
            async with asyncio.timeout(grace + _COUNT_SECONDS):
                remaining = await self.relay.flush(timeout=grace)
        except Exception as exc:  # noqa: BLE001 - stopping must not fail; the outbox keeps it
            _log.warning(
                "outbox not flushed (%s: %s); unpublished messages go out on restart",
                type(exc).__name__,
                exc,
            )
        else:
            if remaining:
                _log.warning(
                    "%d outbox message(s) left unpublished; they go out on restart", remaining
                )
        if self._owns_bus:
            await self.bus.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start_saga(
        self,
        saga: str | SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
    ) -> SagaInstance:
        """Start a saga (see :meth:`Orchestrator.start`)."""
        return await self.orchestrator.start(
            saga, data, saga_id=saga_id, correlation_id=correlation_id
        )

    async def wait_for(self, saga_id: str, *, timeout: float = 30.0) -> SagaInstance:
        """Wait until the saga is terminal or failed (see :meth:`Orchestrator.wait_for`)."""
        return await self.orchestrator.wait_for(saga_id, timeout=timeout)
