"""The orchestrator: the imperative shell around the pure engine.

Every input is one short unit of work: load the saga, ``decide``, then write the new state, the
outgoing messages (to the outbox), the history row and the inbox row in one ``save``. A version
conflict reloads and reapplies (bounded, with jitter); a duplicate message is dropped. The
orchestrator never talks to the broker: the outbox relay publishes what it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from sagas_abstractions import (
    Cancel,
    Compensate,
    ConcurrencyConflict,
    DefinitionChanged,
    DuplicateMessage,
    Envelope,
    ErrorInfo,
    EventKind,
    EventReceived,
    HistoryEntry,
    InboxEntry,
    InvalidEvent,
    InvalidSagaData,
    MessageTooLarge,
    ReplyMessage,
    ReplyStatus,
    Resolve,
    RetryCompensation,
    SagaAlreadyExists,
    SagaChange,
    SagaError,
    SagaInput,
    SagaInstance,
    SagaNotFound,
    SagaRepository,
    SagaStatus,
    Start,
    StepFailed,
    StepKind,
    StepSucceeded,
    UnknownSagaType,
)
from sagas_core._models import trusted
from sagas_core.codec import (
    dead_lettered,
    decode_reply,
    encode_command,
    encode_dead_letter,
    encode_event,
    encode_reply,
)
from sagas_core.definition import EventRole, MissingSagaPolicy
from sagas_core.engine import (
    Decision,
    decide,
    due_input,
    parked,
    rejected,
    resolved_without_definition,
)
from sagas_core.events import EventOutcome, EventRoutes, event_inbox_id, parse_event
from sagas_core.telemetry import Telemetry
from sagas_core.unit_of_work import Again, CommitListener, UnitOfWork

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from datetime import datetime

    from sagas_abstractions import Clock
    from sagas_core.circuit import CircuitBreaker
    from sagas_core.definition import EventTrigger, SagaDefinition
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

_UNDECIDABLE = (InvalidSagaData, UnknownSagaType, DefinitionChanged)
"""What keeps the orchestrator from deciding a stored saga: it parks that saga instead."""

_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

"""Called (synchronously) with the sagas of every committed unit of work."""


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


class StatusEvents(StrEnum):
    """Which status events the orchestrator publishes to the saga-events topic."""

    ALL = "all"
    """Every status change, per step too (the default): what dashboards follow."""
    LIFECYCLE = "lifecycle"
    """The saga's own changes (started, compensating, completed, compensated, failed, resolved,
    operator action), not each step's: a third of the messages of a 3-step saga."""
    NONE = "none"
    """None: nobody follows sagas on the bus (history and telemetry still record everything)."""


_STEP_EVENTS = frozenset(
    {
        EventKind.STEP_COMPLETED,
        EventKind.STEP_FAILED,
        EventKind.STEP_RETRY_SCHEDULED,
        EventKind.STEP_DEFERRED,
        EventKind.STEP_COMPENSATED,
    }
)


# Asked on every commit and reply: set membership and module constants instead of the
# ``is_active`` property's call and the class lookups of enum members (~70 ns each, Python 3.11).
_ACTIVE = frozenset(status for status in SagaStatus if status.is_active)
_SUCCEEDED = ReplyStatus.SUCCEEDED
_ALL_EVENTS, _LIFECYCLE_EVENTS = StatusEvents.ALL, StatusEvents.LIFECYCLE


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class OrphanReplyPolicy(StrEnum):
    """What to do with a reply whose saga does not exist (a finished saga records it as stale)."""

    LOG = "log"
    """Log a warning with the message id and drop it."""
    DEAD_LETTER = "dead-letter"
    """Log a warning and park the reply in the dead-letter queue."""


class SagaRegistry:
    """The saga definitions an orchestrator knows, by saga type."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._definitions: dict[str, SagaDefinition] = {}
        for definition in definitions:
            self.register(definition)

    def register(self, definition: SagaDefinition) -> None:
        """Add a definition; a second one with the same name is an error."""
        existing = self._definitions.get(definition.name)
        if existing is not None and existing is not definition:
            raise SagaAlreadyExists(
                "a saga definition with this name is registered already",
                saga_type=definition.name,
            )
        self._definitions[definition.name] = definition

    def find(self, saga_type: str) -> SagaDefinition | None:
        """The definition for ``saga_type``, or ``None``."""
        return self._definitions.get(saga_type)

    def get(self, saga_type: str, *, saga_id: str | None = None) -> SagaDefinition:
        """The definition for ``saga_type``.

        Raises:
            UnknownSagaType: naming the type and the registered ones.
        """
        definition = self._definitions.get(saga_type)
        if definition is None:
            known = ", ".join(sorted(self._definitions)) or "none"
            raise UnknownSagaType(
                f"no saga definition registered under this type (registered: {known})",
                saga_id=saga_id,
                saga_type=saga_type,
            )
        return definition

    def __iter__(self) -> Iterator[SagaDefinition]:
        return iter(self._definitions.values())

    def __len__(self) -> int:
        return len(self._definitions)


class _EventDelivery(NamedTuple):
    """One delivered event as one trigger of one definition sees it."""

    envelope: Envelope
    definition: SagaDefinition
    trigger: EventTrigger
    event: BaseModel
    outcome: EventOutcome


def _kept_early(decision: Decision, definition: SagaDefinition, trigger: EventTrigger) -> bool:
    """Whether an applied event was kept for a wait step the saga has not reached yet."""
    step = None if trigger.step is None else definition.step(trigger.step)
    if step is None:
        return False
    return decision.instance.steps[step.index].early_event is not None


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
        self.status_events = StatusEvents(status_events)
        self.unit_of_work = UnitOfWork(
            store,
            clock=clock,
            max_conflict_retries=max_conflict_retries,
            instance_cache=instance_cache,
        )
        """Loads, saves and retries sagas; keeps the active ones it saved."""
        # Futures of wait_for callers, by saga id: a commit that settles a saga (no longer
        # active) wakes the waiters of that saga only.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.unit_of_work.add_listener(self._wake_waiters)
        self._routes: tuple[int, EventRoutes] | None = None

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

        See :meth:`UnitOfWork.use_relay <sagas_core.unit_of_work.UnitOfWork.use_relay>`.
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
                    self._change(decision, expected_version=None, inbox=None)
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
        except _UNDECIDABLE as problem:
            await self._park(reply.saga_id, problem, inbox=inbox, message_id=reply.message_id)
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
        return self._event_routes().topics

    def _event_routes(self) -> EventRoutes:
        if self._routes is None or self._routes[0] != len(self.registry):
            self._routes = (len(self.registry), EventRoutes(self.registry))
        return self._routes[1]

    async def handle_event(self, envelope: Envelope) -> EventOutcome:
        """Apply a bus event to every saga it starts, advances or cancels.

        Idempotent per event and saga: a start finds the saga already there (its id comes from
        the event), and an event applied to a saga is recorded in the inbox with the saga's
        change, so a redelivery changes nothing.

        Returns:
            What the event did; when ``dead_letter`` is not empty the caller must park the
            event in the dead-letter queue (the runtime does).
        """
        outcome = EventOutcome()
        try:
            self._check_size(envelope, "event")
        except MessageTooLarge as exc:
            outcome.dead_letter.append(str(exc))
            return outcome
        routes = self._event_routes().get(envelope.key)
        if not routes:
            _log.warning("event %s on topic %r: no saga listens", envelope.message_id, envelope.key)
        with self.telemetry.consume(envelope, system=self.messaging_system):
            for definition, trigger in routes:
                try:
                    event, saga_ids = parse_event(envelope, definition, trigger)
                except InvalidEvent as exc:
                    _log.error("dead-lettering event %s: %s", envelope.message_id, exc)
                    outcome.dead_letter.append(str(exc))
                    continue
                delivery = _EventDelivery(envelope, definition, trigger, event, outcome)
                for saga_id in saga_ids:
                    await self._event_to_saga(delivery, saga_id)
        return outcome

    async def _event_to_saga(self, delivery: _EventDelivery, saga_id: str) -> None:
        envelope, definition, trigger, event, outcome = delivery
        if trigger.role is EventRole.START:
            await self._start_from_event(delivery, saga_id)
            return
        dumped = event.model_dump(mode="json")

        def make(_: SagaInstance) -> SagaInput:
            now = self.clock.now()
            if trigger.role is EventRole.CANCEL:
                return Cancel(event=trigger.name, at=now, message_id=envelope.message_id)
            assert trigger.step is not None  # noqa: S101 - wait_for triggers name their step
            return EventReceived(
                step=trigger.step,
                event=trigger.name,
                at=now,
                message_id=envelope.message_id,
                data=dumped,
            )

        inbox = InboxEntry(self.consumer, event_inbox_id(envelope.message_id, saga_id))
        try:
            decision = await self._apply(saga_id, make, inbox=inbox, saga_type=definition.name)
        except SagaNotFound:
            await self._missing_saga(delivery, saga_id)
            return
        except _UNDECIDABLE as problem:
            await self._park(saga_id, problem, inbox=inbox, message_id=envelope.message_id)
            outcome.ignored.append(saga_id)
            return
        if decision is None:  # a duplicate delivery: applied (or refused) once already
            outcome.ignored.append(saga_id)
        elif not decision.changed:
            # The saga exists but can no longer use the event (finished, compensating, step
            # done): as telling as a missing saga, so the same policy decides what to do.
            why = decision.history[0].reason if decision.history else "not applicable"
            self._unmatched(delivery, saga_id, f"which could not use it ({why})")
        elif _kept_early(decision, definition, trigger):
            outcome.kept.append(saga_id)
        else:
            outcome.applied.append(saga_id)

    async def _missing_saga(self, delivery: _EventDelivery, saga_id: str) -> None:
        if delivery.trigger.missing is MissingSagaPolicy.START:
            if await self._start_from_event(delivery, saga_id):
                await self._event_to_saga(delivery, saga_id)  # then the event, as to any saga
            return
        self._unmatched(delivery, saga_id, "which does not exist")

    def _unmatched(self, delivery: _EventDelivery, saga_id: str, why: str) -> None:
        """An event found no saga that could use it: dead-letter it or log it, per policy."""
        envelope, definition, trigger, _, outcome = delivery
        reason = (
            f"event {trigger.name} (message {envelope.message_id}) for {definition.name} saga "
            f"{saga_id}, {why}"
        )
        if trigger.missing is MissingSagaPolicy.DEAD_LETTER:
            _log.warning("%s: dead-lettered", reason)
            outcome.dead_letter.append(reason)
        else:
            _log.info("%s: ignored", reason)
            outcome.ignored.append(saga_id)

    async def _start_from_event(self, delivery: _EventDelivery, saga_id: str) -> bool:
        """Start the saga the event names; ``False`` when the event was dead-lettered instead."""
        envelope, definition, trigger, event, outcome = delivery
        assert trigger.build_data is not None  # noqa: S101 - start triggers can build data
        prefix = f"event {trigger.name} (message {envelope.message_id}) cannot start"
        try:
            data = trigger.build_data(event)
        except Exception as exc:  # noqa: BLE001 - a user data function failed: it always will
            reason = f"{prefix} {definition.name} saga {saga_id}: {type(exc).__name__}: {exc}"
            _log.exception("dead-lettering: %s", reason)
            outcome.dead_letter.append(reason)
            return False
        trace = {k: v for k, v in envelope.headers.items() if k in _TRACE_HEADERS}
        try:
            _, created = await self._start(
                definition,
                data,
                saga_id=saga_id,
                correlation_id=envelope.correlation_id,
                trace_context=trace,
                cause=(f"event:{trigger.name}", envelope.message_id),
            )
        except (InvalidSagaData, SagaAlreadyExists) as exc:
            reason = f"{prefix} it: {exc}"
            _log.error("dead-lettering: %s", reason)
            outcome.dead_letter.append(reason)
            return False
        # A duplicate (or a second event naming the same saga) never starts a second saga.
        (outcome.started if created else outcome.ignored).append(saga_id)
        return True

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
                except _UNDECIDABLE as problem:
                    # Park it: its deadline is cleared, so it stops coming back here.
                    fired += await self._park(instance.saga_id, problem, inbox=None)
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
        except _UNDECIDABLE:
            event = make()
            if not isinstance(event, Resolve):
                raise  # compensating needs the definition the saga runs under
            # A parked saga the engine cannot decide can still be closed by hand.
            decision = await self._resolve_without_definition(saga_id, event)
        if decision is None:  # pragma: no cover - operator inputs always decide
            raise SagaNotFound("no saga with this id", saga_id=saga_id)
        return decision.instance

    # ------------------------------------------------------------------ sagas it cannot decide

    async def _park(
        self,
        saga_id: str,
        problem: InvalidSagaData | UnknownSagaType | DefinitionChanged,
        *,
        inbox: InboxEntry | None,
        message_id: str | None = None,
    ) -> int:
        """Park a saga that cannot be decided and record the message that found it.

        Returns:
            1 if the saga was parked now, else 0 (already parked or finished, gone, or parked
            by another worker first).
        """
        uow = self.unit_of_work

        async def attempt() -> int | Again:
            instance, readable = await uow.view(saga_id)
            if instance is None:
                _log.warning("saga %s to park is gone: %s", saga_id, problem)
                return 0
            if instance.status.is_terminal or (readable and instance.status is SagaStatus.FAILED):
                await self._record_unmoved(
                    instance, problem, readable=readable, inbox=inbox, message_id=message_id
                )
                return 0
            decision = parked(
                instance,
                error=ErrorInfo(code=problem.park_code, message=str(problem)),
                at=self.clock.now(),
                reason=f"parked: {problem}",
                message_id=message_id,
            )
            change = self._change(
                decision, expected_version=instance.version, inbox=inbox, status_only=True
            )
            try:
                await uow.save(change)
            except ConcurrencyConflict:
                return Again.CONFLICT
            except DuplicateMessage:
                return 0
            _log.error("saga %s parked as failed (%s): %s", saga_id, problem.park_code, problem)
            self.telemetry.record_decision(decision)
            uow.committed([decision.instance])
            return 1

        return await uow.run(attempt, saga_id=saga_id)

    async def _record_unmoved(
        self,
        instance: SagaInstance,
        problem: SagaError,
        *,
        readable: bool,
        inbox: InboxEntry | None,
        message_id: str | None,
    ) -> None:
        """A finished or parked saga stays as it is; a message for it is recorded as stale."""
        if inbox is None:
            return
        if not readable:
            _log.warning(
                "message %s for %s saga %s dropped: %s",
                message_id,
                instance.status.value,
                instance.saga_id,
                problem,
            )
            return
        entry = HistoryEntry(
            saga_id=instance.saga_id,
            version=instance.version,
            at=self.clock.now(),
            input="Park",
            outcome="stale",
            from_status=instance.status,
            to_status=instance.status,
            reason=f"saga is {instance.status.value}, left as it is: {problem}",
            message_id=message_id,
        )
        with contextlib.suppress(DuplicateMessage, ConcurrencyConflict):
            await self.store.save(
                [
                    SagaChange(
                        instance=instance,
                        expected_version=instance.version,
                        history=[entry],
                        inbox=inbox,
                    )
                ]
            )

    async def _resolve_without_definition(self, saga_id: str, event: Resolve) -> Decision:
        uow = self.unit_of_work

        async def attempt() -> Decision | Again:
            instance, _ = await uow.view(saga_id)
            if instance is None:
                raise SagaNotFound("no saga with this id", saga_id=saga_id)
            decision = resolved_without_definition(instance, event)
            change = self._change(
                decision, expected_version=instance.version, inbox=None, status_only=True
            )
            try:
                await uow.save(change)
            except ConcurrencyConflict:
                return Again.CONFLICT
            uow.committed([decision.instance])
            self._observe_decision(decision)
            return decision

        return await uow.run(attempt, saga_id=saga_id)

    # ------------------------------------------------------------------ status API

    async def get(self, saga_id: str) -> SagaInstance:
        """The saga with this id.

        Raises:
            SagaNotFound: no saga has this id.
        """
        instance = await self.store.get(saga_id)
        if instance is None:
            raise SagaNotFound("no saga with this id", saga_id=saga_id)
        return instance

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Sagas matching every given filter, least recently updated first."""
        return await self.store.find(
            status=status, saga_type=saga_type, updated_before=updated_before, limit=limit
        )

    async def history(self, saga_id: str) -> builtins.list[HistoryEntry]:
        """The saga's audit trail, oldest first (every input, applied or stale)."""
        return await self.store.history(saga_id)

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
        instance: SagaInstance | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    instance = await self.get(saga_id)
                    if instance.status not in _ACTIVE:
                        return instance
                    await self._changed(saga_id, poll_interval)
        except TimeoutError as exc:
            where = "not found yet"
            if instance is not None:
                waiting = instance.wait.value if instance.wait else "-"
                where = (
                    f"{instance.status.value} at step {instance.current_step_name!r} "
                    f"(attempt {instance.attempt}, waiting for {waiting})"
                )
            raise TimeoutError(
                f"saga {saga_id} did not settle within {timeout:g}s: {where}; is the participant "
                "for that step running, on the same broker and prefix?"
            ) from exc

    async def _changed(self, saga_id: str, poll_interval: float) -> None:
        """Wait until this process commits the saga settled, or ``poll_interval`` passes."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(saga_id, [])
        waiters.append(waiter)
        # A timer on the future instead of asyncio.wait_for, which makes a task per wait.
        timer = loop.call_later(poll_interval, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(saga_id) is waiters:
                del self._waiters[saga_id]

    # ------------------------------------------------------------------ the unit of work

    async def _apply(
        self,
        saga_id: str,
        make: Callable[[SagaInstance], SagaInput | None],
        *,
        inbox: InboxEntry | None,
        saga_type: str | None = None,
        reject: Callable[[str], Envelope] | None = None,
        refused: str | None = None,
    ) -> Decision | None:
        """Load, decide and save one input, reloading and reapplying on a version conflict.

        A rejected reply is recorded with ``reject(reason)`` (its dead letter) in the outbox,
        without ``inbox``. ``refused`` rejects the reply for that reason without deciding.

        Raises:
            SagaNotFound: No saga has this id (or, with ``saga_type``, none of that type).
            InvalidSagaData: The stored saga does not parse (as a saga, or its data).
            UnknownSagaType: The saga's type is not registered.
            DefinitionChanged: The saga started under another definition.
            ConcurrencyConflict: The conflicts outlasted the retries.
        """
        uow = self.unit_of_work

        async def attempt() -> Decision | Again | None:
            instance, kept = await uow.load(saga_id)
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
                        self._change(decision, expected_version=instance.version, inbox=inbox)
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

        return await uow.run(attempt, saga_id=saga_id, saga_type=saga_type)

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

    def _change(
        self,
        decision: Decision,
        *,
        expected_version: int | None,
        inbox: InboxEntry | None,
        status_only: bool = False,
    ) -> SagaChange:
        return SagaChange(
            instance=decision.instance,
            expected_version=expected_version,
            outbox=self._envelopes(decision),
            history=decision.history,
            inbox=inbox,
            status_only=status_only,
        )

    def _envelopes(self, decision: Decision) -> builtins.list[Envelope]:
        # Lists, not generators, and none for what a decision does not have: it makes a
        # handful of messages, and a generator costs about as much as encoding one.
        reply_to = self.reply_to
        envelopes = [encode_command(command, reply_to=reply_to) for command in decision.commands]
        if decision.dead_letters:
            envelopes += [encode_dead_letter(dead) for dead in decision.dead_letters]
        if decision.events:
            if self.status_events is _ALL_EVENTS:
                envelopes += [encode_event(event) for event in decision.events]
            elif self.status_events is _LIFECYCLE_EVENTS:
                envelopes += [
                    encode_event(event)
                    for event in decision.events
                    if event.kind not in _STEP_EVENTS
                ]
        # The deciding span's context travels with the outbox rows (published after a restart,
        # a message still joins its saga's trace).
        return self.telemetry.stamp(envelopes)  # unchanged while tracing is off

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

    def _wake_waiters(self, instances: Sequence[SagaInstance]) -> None:
        """Commit listener: wake the ``wait_for`` callers of each saga that settled."""
        if self._waiters:
            for instance in instances:
                # wait_for waits for a saga to settle: an active saga's waiters stay asleep.
                if instance.status not in _ACTIVE:
                    for waiter in self._waiters.pop(instance.saga_id, ()):
                        _wake(waiter)
