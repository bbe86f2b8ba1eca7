"""The orchestrator: the imperative shell around the pure engine.

Every input (a start, a reply, a deadline, a bus event, an operator action) is one short unit of
work (:class:`~sagas_core.unit_of_work.SagaUnitOfWork`): load the saga, ``decide``, then write the
new state, the outgoing messages (to the outbox), the history row and the inbox row in one
``save``. A version conflict reloads and reapplies (bounded, with jitter); a duplicate message is
dropped. The orchestrator translates inputs into those units of work; its collaborators route
bus events (:mod:`~sagas_core.event_routing`), park the sagas it cannot decide
(:mod:`~sagas_core.parking`), build each commit's change (:mod:`~sagas_core.changes`) and read
sagas (:mod:`~sagas_core.queries`). It never talks to the broker: the outbox relay publishes
what it committed.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from sagas_abstractions import (
    Compensate,
    ConcurrencyConflict,
    DefinitionChanged,
    DuplicateMessage,
    Envelope,
    InboxEntry,
    InvalidSagaData,
    MessageTooLarge,
    ReplyMessage,
    ReplyStatus,
    Resolve,
    RetryCompensation,
    SagaAlreadyExists,
    SagaChange,
    SagaInput,
    SagaInstance,
    SagaNotFound,
    SagaRepository,
    SagaStatus,
    Start,
    StepFailed,
    StepKind,
    StepSucceeded,
)
from sagas_core._models import trusted
from sagas_core.changes import ChangeBuilder, StatusEvents
from sagas_core.codec import dead_lettered, decode_reply, encode_reply
from sagas_core.engine import Decision, decide, due_input, rejected
from sagas_core.event_routing import EventRouter
from sagas_core.events import EventOutcome
from sagas_core.parking import UNDECIDABLE, Parking
from sagas_core.queries import SagaQueries
from sagas_core.registry import SagaRegistry
from sagas_core.telemetry import Telemetry
from sagas_core.unit_of_work import Again, CommitListener, SagaUnitOfWork

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Coroutine, Iterable, Mapping
    from datetime import datetime

    from sagas_abstractions import Clock, HistoryEntry
    from sagas_core.circuit import CircuitBreaker
    from sagas_core.definition import SagaDefinition
    from sagas_core.relay import OutboxRelay

__all__ = [
    "CommitListener",
    "Orchestrator",
    "OrphanReplyPolicy",
    "SagaRegistry",
    "StatusEvents",
    "reply_queue",
]

_log = logging.getLogger("sagas.orchestrator")

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest reply or event body the orchestrator parses, by default (1 MiB)."""
DEFAULT_MAX_DATA_BYTES = 256 * 1024
"""The most a saga's data (and one reply's data) may take as JSON, by default (256 KiB)."""

DEFAULT_DEADLINE_LEASE = timedelta(seconds=5)
"""How long :meth:`Orchestrator.fire_due` holds the deadlines it claims, by default."""

# Asked on every reply: a module constant instead of the class lookup of the enum member.
_SUCCEEDED = ReplyStatus.SUCCEEDED


def _uuid4_hex() -> str:
    """``uuid.uuid4().hex`` (the same random bits, version and variant) in a quarter of the time.

    ``uuid4`` builds a ``UUID`` object first; a saga id only needs its text.
    """
    value = int.from_bytes(os.urandom(16))
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # variant: RFC 4122
    value = (value & ~(0xF000 << 64)) | (4 << 76)  # version 4
    return f"{value:032x}"


def _reply_token() -> str:
    """A new reply token: 128 random bits, URL-safe text (an AMQP header value as it is)."""
    return secrets.token_urlsafe(16)


def reply_queue(group: str) -> str:
    """The reply queue of an orchestrator group."""
    return f"sagas.replies.{group}"


class OrphanReplyPolicy(StrEnum):
    """What to do with a reply whose saga does not exist (a finished saga records it as stale)."""

    LOG = "log"
    """Log a warning with the message id and drop it."""
    DEAD_LETTER = "dead-letter"
    """Log a warning and park the reply in the dead-letter queue."""


class Orchestrator:
    """Starts sagas and applies replies, timeouts and operator actions to them.

    Args:
        store: The state backend.
        definitions: The saga definitions this orchestrator runs.
        clock: The source of time.
        group: The orchestrator group; its reply queue is ``sagas.replies.<group>``.
        max_conflict_retries: How often a version conflict is reloaded and reapplied.
        orphan_replies: What to do with replies for sagas that do not exist.
        id_factory: Makes new saga ids.
        breaker: Defers commands to destinations whose circuit is open (off when ``None``).
        telemetry: Spans and metrics (:meth:`Telemetry.default`, the global providers, when
            ``None``).
        status_events: Which status events go to the saga-events topic (all, the saga's own
            lifecycle only, or none); history and telemetry record everything regardless.
        reply_tokens: Makes the reply token of each command (docs/protocol.md, section 5.1):
            unguessable, so only the command's readers can answer it. Tests may make them
            predictable; production must not.
        max_message_bytes: The largest reply or event body it parses; a larger one is refused
            unparsed (:class:`~sagas_abstractions.MessageTooLarge` for a reply, dead-lettered
            by the runtime; a dead-letter outcome for an event). ``None``: no limit.
        max_data_bytes: The most bytes a saga's data, and one reply's data, may take as JSON
            (``decide``'s limit): a start over it is refused, a reply that would pass it fails
            its step. ``None``: no limit.
        reply_users: The broker user each destination's participant publishes as, by
            destination (docs/protocol.md, section 5.2): a reply envelope for a step of such
            a destination is rejected unless the broker validated that ``user_id`` on it.
            Destinations not listed are not checked.
        instance_cache: How many active sagas it saved last the orchestrator keeps in memory
            (least recently saved out first), to decide their next input without loading them
            first; 0 loads every time. The version check of the save finds an entry that went
            stale (another worker moved the saga on): it is dropped, loaded and decided again.
            Edit a saga's stored row by hand only with its ``version`` raised, so a worker that
            keeps it notices.
    """

    def __init__(
        self,
        *,
        store: SagaRepository,
        definitions: Iterable[SagaDefinition] | SagaRegistry,
        clock: Clock,
        group: str = "default",
        max_conflict_retries: int = 20,
        orphan_replies: OrphanReplyPolicy = OrphanReplyPolicy.LOG,
        id_factory: Callable[[], str] = _uuid4_hex,
        breaker: CircuitBreaker | None = None,
        telemetry: Telemetry | None = None,
        instance_cache: int = 0,
        status_events: StatusEvents | str = StatusEvents.ALL,
        reply_tokens: Callable[[], str] = _reply_token,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        max_data_bytes: int | None = DEFAULT_MAX_DATA_BYTES,
        reply_users: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.reply_users = dict(reply_users or {})
        self.reply_tokens = reply_tokens
        self.max_message_bytes = max_message_bytes
        self.max_data_bytes = max_data_bytes
        self.breaker = breaker
        self.telemetry = telemetry or Telemetry.default()
        self.messaging_system = "sagas"
        """``messaging.system`` on reply spans (the runtime sets the bus's)."""
        if breaker is not None:
            self.telemetry.watch_breaker(breaker)
        self.registry = (
            definitions if isinstance(definitions, SagaRegistry) else SagaRegistry(definitions)
        )
        self.clock = clock
        self.group = group
        self.reply_to = reply_queue(group)
        self.consumer = f"orchestrator.{group}"
        self.orphan_replies = orphan_replies
        self.id_factory = id_factory
        self.unit_of_work = SagaUnitOfWork(
            store,
            clock=clock,
            max_conflict_retries=max_conflict_retries,
            instance_cache=instance_cache,
        )
        """Loads, saves and retries sagas; keeps the active ones it saved."""
        self.changes = ChangeBuilder(
            reply_to=self.reply_to,
            status_events=StatusEvents(status_events),
            telemetry=self.telemetry,
        )
        """Makes the change each decision commits."""
        self.parking = Parking(
            self.unit_of_work,
            self.changes,
            clock=clock,
            telemetry=self.telemetry,
            observe=self._observe_decision,
        )
        """Parks the sagas this orchestrator cannot decide."""
        self.events = EventRouter(
            self.registry,
            clock=clock,
            telemetry=self.telemetry,
            consumer=self.consumer,
            apply=self._apply,
            start=self._start,
            park=self.parking.park,
        )
        """Applies bus events to the sagas they start, advance or cancel."""
        self.queries = SagaQueries(store)
        """Reads sagas, and waits for them to settle."""
        self.unit_of_work.add_listener(self.queries.committed)

    @property
    def status_events(self) -> StatusEvents:
        """Which status events go to the saga-events topic."""
        return self.changes.status_events

    @status_events.setter
    def status_events(self, value: StatusEvents | str) -> None:
        self.changes.status_events = StatusEvents(value)

    @property
    def conflicts(self) -> int:
        """Version conflicts met so far (each reloaded and reapplied)."""
        return self.unit_of_work.conflicts

    @property
    def stale_cache(self) -> int:
        """Saves refused because a kept instance had gone stale (reloaded, not conflicts)."""
        return self.unit_of_work.stale_cache

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener`` after every commit."""
        self.unit_of_work.add_listener(listener)

    def use_relay(self, relay: OutboxRelay) -> None:
        """Hand what each commit wrote to the outbox to ``relay``, this process's relay.

        See :meth:`SagaUnitOfWork.use_relay <sagas_core.unit_of_work.SagaUnitOfWork.use_relay>`.
        """
        self.unit_of_work.use_relay(relay)

    # ------------------------------------------------------------------ starting

    async def start(
        self,
        saga: str | SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> SagaInstance:
        """Start a saga and return it as committed.

        With an explicit ``saga_id`` the call is idempotent: starting the same id again returns
        the existing saga (whatever its status) instead of starting a second one.

        Raises:
            UnknownSagaType: ``saga`` is not registered.
            InvalidSagaData: ``data`` does not fit the saga's data model (nothing is written).
            SagaAlreadyExists: ``saga_id`` belongs to a saga of another type.
        """
        instance, _ = await self._start(
            saga,
            data,
            saga_id=saga_id,
            correlation_id=correlation_id,
            trace_context=trace_context,
        )
        return instance

    async def _start(
        self,
        saga: str | SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None,
        correlation_id: str | None,
        trace_context: Mapping[str, str] | None,
        cause: tuple[str, str] | None = None,
    ) -> tuple[SagaInstance, bool]:
        """Start a saga; also says whether this call created it (``False``: it existed).

        ``cause`` is ``(source, message id)`` of what started it, recorded in the history.
        """
        name = saga if isinstance(saga, str) else saga.name
        definition = self.registry.get(name)
        raw = data.model_dump(mode="json") if isinstance(data, BaseModel) else dict(data)
        new_id = saga_id or self.id_factory()
        # No load first: the insert refuses an existing id (a version conflict), and only then
        # is the existing saga loaded and returned. One statement per new saga instead of two.
        with self.telemetry.saga_start(name, new_id, trace_context) as span:
            event = Start(
                saga_id=new_id,
                data=raw,
                at=self.clock.now(),
                correlation_id=correlation_id,
                # The start span's context, stored on the saga so later spans can join it.
                trace_context=self.telemetry.trace_context(trace_context),
                source=None if cause is None else cause[0],
                message_id=None if cause is None else cause[1],
            )
            try:
                decision = decide(
                    definition,
                    None,
                    event,
                    circuits=self._circuits(),
                    reply_token=self.reply_tokens(),
                    max_data_bytes=self.max_data_bytes,
                )
            except InvalidSagaData:
                # Starting an existing id returns it whatever the data (or refuses another type).
                existing = None if saga_id is None else await self.store.load(new_id)
                if existing is None:
                    raise
                return self._existing(existing, definition), False
            try:
                handed = await self.unit_of_work.save(
                    self.changes.change(decision, expected_version=None, inbox=None)
                )
            except ConcurrencyConflict:
                # The id exists (started before, or by a racing start): that saga stands.
                existing = await self.store.load(new_id)
                if existing is None:
                    raise
                if span is not None:
                    span.set_attribute("saga.existing", True)  # noqa: FBT003 - OTel API
                return self._existing(existing, definition), False
            if span is not None:
                self.telemetry.decided(span, decision)
            self.unit_of_work.committed([decision.instance], claim=not handed)
            self._observe_decision(decision)
        if _log.isEnabledFor(logging.INFO):  # spares the extra dict on every start
            _log.info("saga started", extra={"saga_id": new_id, "saga_type": name})
        return decision.instance, True

    def _existing(self, existing: SagaInstance, definition: SagaDefinition) -> SagaInstance:
        if existing.saga_type != definition.name:
            raise SagaAlreadyExists(
                f"a {existing.saga_type!r} saga already has this id",
                saga_id=existing.saga_id,
                saga_type=definition.name,
            )
        return existing

    # ------------------------------------------------------------------ replies

    async def handle_envelope(self, envelope: Envelope) -> None:
        """Handle a reply envelope from the bus (the reply queue's consumer).

        Raises:
            MessageTooLarge: the body is over ``max_message_bytes``; it was not parsed (a
                :class:`MessageDecodeError`: dead-lettered at once, with the error as the reason).
            MessageDecodeError: the envelope does not follow the protocol (the bus dead-letters
                it at once, with the error as the reason: it cannot get better).
            StoreUnavailable: the store cannot be reached (the bus holds the reply, uncounted,
                until it answers).
        """
        self._check_size(envelope, "reply")
        telemetry = self.telemetry
        if telemetry.tracing_off():
            # consume() would make no span
            await self.handle_reply(decode_reply(envelope), envelope=envelope)
            return
        with telemetry.consume(envelope, system=self.messaging_system) as span:
            reply = decode_reply(envelope)
            if span is not None:
                telemetry.failed(span, reply.error)
            await self.handle_reply(reply, envelope=envelope)

    def _check_size(self, envelope: Envelope, what: str) -> None:
        """Refuse a body over the limit before anything parses it."""
        limit, size = self.max_message_bytes, len(envelope.body)
        if limit is None or size <= limit:
            return
        _log.warning(
            "%s %s for saga %s is %d bytes, over the limit of %d: dead-lettered unparsed",
            what,
            envelope.message_id,
            envelope.correlation_id,
            size,
            limit,
        )
        raise MessageTooLarge(
            f"{what} {envelope.message_id!r} is {size} bytes, over the message limit of {limit} "
            "bytes (SAGAS_MAX_MESSAGE_BYTES); not parsed",
            size=size,
            limit=limit,
            saga_id=envelope.correlation_id,
        )

    async def handle_reply(
        self, reply: ReplyMessage, *, envelope: Envelope | None = None
    ) -> Decision | None:
        """Apply a participant's reply; returns the decision, or ``None`` when none was made.

        ``None`` covers a duplicate, an orphan (the saga does not exist, or is not of the type
        the reply names) and a saga this orchestrator cannot decide (a stored row that does
        not parse, an unregistered type, a changed definition): that saga is parked and the
        reply recorded, so it is acked, not redelivered.

        A reply that does not echo its command's reply token is rejected
        (:attr:`Decision.rejected`): recorded in the saga's history, and parked in the
        dead-letter queue (``envelope`` as received, or the reply encoded again) in the same
        transaction, never applied. Its message id is not recorded as processed, so the genuine
        reply with the same id is still applied when it comes.
        """
        # No inbox pre-check: the save records the message id in the same transaction and
        # refuses a duplicate (DuplicateMessage), which saves a round trip on every reply.

        def make(_: SagaInstance) -> SagaInput:
            # Made anew for every attempt (a conflict reloads and decides again, later). The
            # reply was validated, so its values need no second validation.
            values: dict[str, Any] = {
                "step": reply.step,
                "attempt": reply.attempt,
                "kind": reply.kind,
                "at": self.clock.now(),
                "message_id": reply.message_id,
            }
            if reply.status is _SUCCEEDED:
                values["data"] = reply.data
                values["reply_token"] = reply.reply_token
                return trusted(StepSucceeded, values)
            assert reply.error is not None  # noqa: S101 - the codec guarantees it
            values["error"] = reply.error
            values["reply_token"] = reply.reply_token
            return trusted(StepFailed, values)

        def reject(reason: str) -> Envelope:
            received = envelope if envelope is not None else encode_reply(reply, self.reply_to)
            _log.warning(
                "reply %s for saga %s (%s, step %s, attempt %d) dead-lettered: %s",
                reply.message_id,
                reply.saga_id,
                reply.saga_type,
                reply.step,
                reply.attempt,
                reason,
            )
            return dead_lettered(
                received,
                f"{reason} (saga {reply.saga_id}, step {reply.step!r}, attempt {reply.attempt})",
            )

        inbox = InboxEntry(self.consumer, reply.message_id)
        refused = None
        if self.reply_users and envelope is not None:
            refused = self._wrong_user(reply, envelope.user_id)
        try:
            decision = await self._apply(
                reply.saga_id,
                make,
                inbox=inbox,
                saga_type=reply.saga_type,
                reject=reject,
                refused=refused,
            )
        except SagaNotFound:
            await self._orphan(reply)
        except UNDECIDABLE as problem:
            await self.parking.park(
                reply.saga_id, problem, inbox=inbox, message_id=reply.message_id
            )
        else:
            # Not a duplicate nor a forgery: tell the breaker how the destination did.
            if decision is not None and decision.rejected is None:
                self._observe_reply(reply)
            return decision
        return None

    def _wrong_user(self, reply: ReplyMessage, user_id: str | None) -> str | None:
        """Why the broker-validated publisher of ``reply`` is not its destination's, if so."""
        destination = self._destination(reply.saga_type, reply.step, reply.kind)
        expected = None if destination is None else self.reply_users.get(destination)
        if expected is None or user_id == expected:
            return None
        publisher = "without a user id" if user_id is None else f"by AMQP user {user_id!r}"
        return (
            f"reply rejected: published {publisher}, not by {expected!r}, the user of "
            f"destination {destination!r}"
        )

    async def _orphan(self, reply: ReplyMessage) -> None:
        _log.warning(
            "reply %s for unknown saga %s (%s, step %s, attempt %d): %s",
            reply.message_id,
            reply.saga_id,
            reply.saga_type,
            reply.step,
            reply.attempt,
            "dead-lettered" if self.orphan_replies is OrphanReplyPolicy.DEAD_LETTER else "dropped",
        )
        if self.orphan_replies is OrphanReplyPolicy.DEAD_LETTER:
            raise SagaNotFound(
                "reply for a saga that does not exist",
                saga_id=reply.saga_id,
                saga_type=reply.saga_type,
                step=reply.step,
            )

    # ------------------------------------------------------------------ bus events

    @property
    def event_topics(self) -> tuple[str, ...]:
        """Every topic a registered saga starts on, waits for or is cancelled by."""
        return self.events.topics

    async def handle_event(self, envelope: Envelope) -> EventOutcome:
        """Apply a bus event to every saga it starts, advances or cancels.

        Idempotent per event and saga: a start finds the saga already there (its id comes from
        the event), and an event applied to a saga is recorded in the inbox with the saga's
        change, so a redelivery changes nothing.

        Returns:
            What the event did; when ``dead_letter`` is not empty the caller must park the
            event in the dead-letter queue (the runtime does).
        """
        try:
            self._check_size(envelope, "event")
        except MessageTooLarge as exc:
            return EventOutcome(dead_letter=[str(exc)])
        return await self.events.route(envelope, system=self.messaging_system)

    # ------------------------------------------------------------------ deadlines

    async def fire_due(
        self,
        *,
        now: datetime | None = None,
        limit: int = 100,
        owner: str | None = None,
        lease: timedelta = DEFAULT_DEADLINE_LEASE,
    ) -> int:
        """Apply every passed deadline (step timeouts, retries, saga timeouts) due at ``now``.

        Safe to run in several workers at once: a deadline that another worker fired first is
        no longer due after the reload, so it fires once. With an ``owner`` (each worker its
        own), the due sagas are claimed for ``lease`` first
        (:meth:`~sagas_abstractions.DeadlineStore.claim_due`), so competing workers take
        disjoint batches instead of racing on the same sagas; a claim left by a worker that
        died is taken over once its lease has passed. Without one, every caller sees every due
        saga (:meth:`~sagas_abstractions.DeadlineStore.due`).

        Args:
            now: The moment to fire at (the clock's now by default).
            limit: At most this many due sagas are handled.
            owner: Who claims the due sagas; ``None`` reads them without claiming.
            lease: How long a claim holds; longer than handling ``limit`` sagas takes.

        A due saga this orchestrator cannot decide (its stored row does not parse, its type is
        not registered, its definition changed) is parked instead, which clears its deadlines.

        Returns:
            How many inputs were applied (parks included).
        """
        moment = now or self.clock.now()
        fired = 0
        if owner is None:
            due = await self.store.due(moment, limit)
        else:
            due = await self.store.claim_due(moment, limit, owner=owner, lease=lease)
        for instance in due:

            def make(current: SagaInstance) -> SagaInput | None:
                return due_input(current, self.clock.now() if now is None else moment)

            try:
                try:
                    decision = await self._apply(instance.saga_id, make, inbox=None)
                except UNDECIDABLE as problem:
                    # Park it: its deadline is cleared, so it stops coming back here.
                    fired += await self.parking.park(instance.saga_id, problem, inbox=None)
                    continue
            except ConcurrencyConflict as exc:
                # One saga this worker cannot move must not hold up the others behind it.
                _log.error("deadline of saga %s not applied: %s", instance.saga_id, exc)
                continue
            if decision is not None and decision.changed:
                fired += 1
        return fired

    # ------------------------------------------------------------------ operator actions

    async def compensate(self, saga_id: str, *, actor: str, reason: str = "") -> SagaInstance:
        """Stop a running saga and compensate what it did (recorded in history with ``actor``)."""
        return await self._operator(
            saga_id, lambda: Compensate(at=self.clock.now(), actor=actor, reason=reason)
        )

    async def retry_compensation(
        self, saga_id: str, *, actor: str, reason: str = ""
    ) -> SagaInstance:
        """Try the failed compensation of a parked saga again, with a fresh round of attempts."""
        return await self._operator(
            saga_id, lambda: RetryCompensation(at=self.clock.now(), actor=actor, reason=reason)
        )

    async def resolve(self, saga_id: str, *, actor: str, note: str) -> SagaInstance:
        """Close a parked saga by hand, with a note saying what was done."""
        return await self._operator(
            saga_id, lambda: Resolve(at=self.clock.now(), actor=actor, reason=note)
        )

    async def _operator(self, saga_id: str, make: Callable[[], SagaInput]) -> SagaInstance:
        try:
            decision = await self._apply(saga_id, lambda _: make(), inbox=None)
        except UNDECIDABLE:
            event = make()
            if not isinstance(event, Resolve):
                raise  # compensating needs the definition the saga runs under
            # A parked saga the engine cannot decide can still be closed by hand.
            decision = await self.parking.resolve(saga_id, event)
        if decision is None:  # pragma: no cover - operator inputs always decide
            raise SagaNotFound("no saga with this id", saga_id=saga_id)
        return decision.instance

    # ------------------------------------------------------------------ status API

    async def get(self, saga_id: str) -> SagaInstance:
        """The saga with this id.

        Raises:
            SagaNotFound: no saga has this id.
        """
        return await self.queries.get(saga_id)

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Sagas matching every given filter, least recently updated first."""
        return await self.queries.list(
            status=status, saga_type=saga_type, updated_before=updated_before, limit=limit
        )

    async def history(self, saga_id: str) -> builtins.list[HistoryEntry]:
        """The saga's audit trail, oldest first (every input, applied or stale)."""
        return await self.queries.history(saga_id)

    async def wait_for(
        self,
        saga_id: str,
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.05,
    ) -> SagaInstance:
        """Wait until the saga is terminal or failed, and return it.

        Wakes when this process commits the saga settled, and polls the store (so it sees other
        workers' commits too).

        Raises:
            TimeoutError: the saga did not settle within ``timeout`` seconds; the message says
                where it stands (status, step, what it waits for).
        """
        return await self.queries.wait_for(saga_id, timeout=timeout, poll_interval=poll_interval)

    # ------------------------------------------------------------------ the unit of work

    def _apply(
        self,
        saga_id: str,
        make: Callable[[SagaInstance], SagaInput | None],
        *,
        inbox: InboxEntry | None,
        saga_type: str | None = None,
        reject: Callable[[str], Envelope] | None = None,
        refused: str | None = None,
    ) -> Coroutine[Any, Any, Decision | None]:
        """Load, decide and save one input, reloading and reapplying on a version conflict.

        A rejected reply is recorded with ``reject(reason)`` (its dead letter) in the outbox,
        without ``inbox``. ``refused`` rejects the reply for that reason without deciding.

        Not a coroutine function: it returns the unit of work's run for the caller to await,
        which spares every input a coroutine that would only await another.

        Raises:
            SagaNotFound: No saga has this id (or, with ``saga_type``, none of that type).
            InvalidSagaData: The stored saga does not parse (as a saga, or its data).
            UnknownSagaType: The saga's type is not registered.
            DefinitionChanged: The saga started under another definition.
            ConcurrencyConflict: The conflicts outlasted the retries.
        """
        uow = self.unit_of_work

        async def attempt() -> Decision | Again | None:
            instance = uow.kept_copy(saga_id)
            kept = instance is not None
            if instance is None:
                instance = await uow.load(saga_id)
            if instance is None or (saga_type is not None and instance.saga_type != saga_type):
                raise SagaNotFound("no saga with this id", saga_id=saga_id, saga_type=saga_type)
            definition = self.registry.get(instance.saga_type, saga_id=saga_id)
            if instance.definition_version != definition.fingerprint:
                raise DefinitionChanged(
                    saga_id=saga_id,
                    saga_type=definition.name,
                    started_with=instance.definition_version,
                    current=definition.fingerprint,
                )
            event = make(instance)
            if event is None:
                return None
            with self.telemetry.saga_input(instance, event) as span:
                if refused is not None and isinstance(event, StepSucceeded | StepFailed):
                    decision = rejected(instance, event, refused)
                else:
                    decision = decide(
                        definition,
                        instance,
                        event,
                        circuits=None if self.breaker is None else self._circuits(),
                        reply_token=self.reply_tokens(),
                        max_data_bytes=self.max_data_bytes,
                    )
                if decision.rejected is not None:
                    if kept:
                        # Judge a forgery on the stored saga, never on a kept copy.
                        uow.forget(saga_id)
                        return Again.RELOAD
                    await self._record_rejected(decision, reject)
                    return decision
                if not decision.changed and inbox is None:
                    # e.g. a deadline another worker fired first: nothing to record
                    return decision
                try:
                    handed = await uow.save(
                        self.changes.change(
                            decision, expected_version=instance.version, inbox=inbox
                        )
                    )
                except ConcurrencyConflict:
                    # A fresh load next time: retrying on stale state can never succeed.
                    return uow.conflict(kept=kept)
                except DuplicateMessage:
                    _log.debug("duplicate message %s ignored", inbox.message_id if inbox else "")
                    return None
                if span is not None:
                    self.telemetry.decided(span, decision)
                uow.committed([decision.instance], claim=not handed)
                self._observe_decision(decision)
                return decision

        return uow.run(attempt, saga_id=saga_id, saga_type=saga_type)

    async def _record_rejected(
        self, decision: Decision, reject: Callable[[str], Envelope] | None
    ) -> None:
        """Write a rejected reply's history row and dead letter, and no inbox row."""
        assert decision.rejected is not None  # noqa: S101 - only called for a rejection
        change = SagaChange(
            instance=decision.instance,
            expected_version=decision.instance.version,
            outbox=[] if reject is None else [reject(decision.rejected)],
            history=decision.history,
        )
        handed = await self.unit_of_work.save(change)
        self.unit_of_work.committed([decision.instance], claim=not handed)
        self.telemetry.record_decision(decision)

    def _circuits(self) -> dict[str, datetime] | None:
        return None if self.breaker is None else self.breaker.blocked(self.clock.now())

    def _destination(self, saga_type: str, step: str, kind: StepKind) -> str | None:
        definition = self.registry.find(saga_type)
        step_def = None if definition is None else definition.step(step)
        spec = None if step_def is None else step_def.spec(kind)
        return None if spec is None else spec.destination

    def _observe_reply(self, reply: ReplyMessage) -> None:
        """Tell the breaker how the destination behaved: answered, or failed transiently."""
        if self.breaker is None:
            return
        destination = self._destination(reply.saga_type, reply.step, reply.kind)
        if destination is None:
            return
        if reply.error is not None and reply.error.retryable:
            self.breaker.record_failure(destination, self.clock.now())
        else:
            self.breaker.record_success(destination)

    def _observe_decision(self, decision: Decision) -> None:
        self.telemetry.record_decision(decision)
        if self.breaker is None:
            return
        for command in decision.commands:
            self.breaker.record_sent(command.destination)
        for entry in decision.history:
            if (
                entry.input == "Timeout"
                and entry.outcome == "applied"
                and entry.step
                and entry.kind
            ):
                destination = self._destination(decision.instance.saga_type, entry.step, entry.kind)
                if destination is not None:
                    self.breaker.record_failure(destination, self.clock.now())
