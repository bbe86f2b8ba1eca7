"""The ports: small protocols the core depends on and adapters implement.

Each port has one job, a real in-memory implementation in ``sagas_core.memory`` (re-exported by
``sagas_core.testing``), and a contract test suite in ``tests/contracts`` that every backend passes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Mapping
    from datetime import datetime, timedelta
    from typing import Any

    from sagas_abstractions.enums import ReplyStatus, RouteKind, SagaStatus
    from sagas_abstractions.messages import Envelope, OutboxRecord
    from sagas_abstractions.models import ErrorInfo, HistoryEntry, SagaInstance

__all__ = [
    "CachedOutcome",
    "Clock",
    "DeadlineStore",
    "IdempotencyStore",
    "InboxEntry",
    "MessageBus",
    "MessageHandler",
    "OutboxHandoff",
    "OutboxStore",
    "SagaChange",
    "SagaReader",
    "SagaRepository",
    "SagaStore",
    "Subscription",
    "TransactionalIdempotencyStore",
    "UnitOfWork",
]


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """A processed message id, recorded in the same transaction as the change it caused."""

    consumer: str
    message_id: str


@dataclass(frozen=True, slots=True)
class SagaChange:
    """Everything one input changes, written atomically by :meth:`SagaStore.save`.

    Attributes:
        instance: The saga after the input.
        expected_version: ``None`` to insert a new saga (it must not exist); otherwise the
            version the writer loaded. When ``instance.version`` is greater, the saga row is
            updated only if the stored version still equals ``expected_version``
            (else :class:`~sagas_abstractions.errors.ConcurrencyConflict`); when equal, the saga
            row is left alone and only the history, outbox and inbox rows are written.
        outbox: Messages to publish once the transaction commits.
        history: Audit rows to append.
        inbox: The incoming message id to record as processed, if the input came as a message
            (a second record of the same id raises
            :class:`~sagas_abstractions.errors.DuplicateMessage`).
        status_only: Write only the instance's status, error, wait, deadlines, version and
            ``updated_at``; its data, steps and every other stored field stay as they are. This
            is how the orchestrator parks (or resolves) a saga it cannot decide: a stored row
            that no longer parses, an unregistered saga type, a changed definition. The row is
            never rewritten from a partial view of it. Updates only (``expected_version`` set).
    """

    instance: SagaInstance
    expected_version: int | None
    outbox: Sequence[Envelope] = field(default=())
    history: Sequence[HistoryEntry] = field(default=())
    inbox: InboxEntry | None = None
    status_only: bool = False


@runtime_checkable
class SagaStore(Protocol):
    """Loads saga instances and writes the effects of inputs atomically."""

    async def load(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``.

        Raises:
            InvalidSagaData: The stored saga no longer parses (naming the saga); the orchestrator
                parks it. Readers (:class:`SagaReader`, :class:`DeadlineStore`) show such a row
                as best they can instead of failing (see the backend's documentation).
        """
        ...

    async def save(self, changes: Sequence[SagaChange]) -> None:
        """Write all changes in one transaction: all of them, or none.

        Raises:
            ConcurrencyConflict: A saga changed since it was loaded, or a saga to insert exists.
            DuplicateMessage: An inbox entry was recorded before.
            StoreError: The store failed.
        """
        ...

    async def is_processed(self, consumer: str, message_id: str) -> bool:
        """Whether the inbox records this message id for this consumer (a cheap pre-check)."""
        ...


@runtime_checkable
class SagaReader(Protocol):
    """Read-only queries for the status API and operators."""

    async def get(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``."""
        ...

    async def find(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> list[SagaInstance]:
        """Return sagas matching every given filter, least recently updated first."""
        ...

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """Return the saga's audit trail, oldest first."""
        ...


@runtime_checkable
class OutboxStore(Protocol):
    """The outbox: messages committed with a state change, waiting to be published."""

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> list[OutboxRecord]:
        """Lease up to ``limit`` unsent records to ``owner``, oldest first.

        A record leased by another owner whose lease has not expired is never returned, and
        neither is any later record of the same saga (messages of one saga go out in order).
        """
        ...

    async def mark_sent(self, ids: Sequence[int], *, now: datetime) -> None:
        """Mark records as published (after the bus confirmed them)."""
        ...

    async def release(self, ids: Sequence[int], *, retry_at: datetime, error: str) -> None:
        """Give leased records back after a failed publish; they are claimable at ``retry_at``."""
        ...

    async def pending_count(self) -> int:
        """How many records wait to be published."""
        ...


@runtime_checkable
class OutboxHandoff(Protocol):
    """Optional: a save that leases the outbox records it writes to the writer's own relay.

    The orchestrator uses it when its store has it: the records of a commit are written already
    leased to the relay of the same process and handed to that relay in memory, so they are
    published at once, without a claim query. Nothing is lost when the process dies between
    the commit and the publish: the records stay in the outbox, leased, and once the lease has
    passed :meth:`OutboxStore.claim` gives them to whichever relay asks (the recovery path).
    """

    async def save_leased(
        self, changes: Sequence[SagaChange], *, owner: str, until: datetime
    ) -> list[OutboxRecord]:
        """Save like :meth:`SagaStore.save`, the outbox records leased to ``owner`` until ``until``.

        A change's records are leased only when every earlier unsent record of its saga is
        leased to ``owner`` too, so the owner holds all of the saga's unsent messages and can
        keep their order; otherwise they are written unleased, for :meth:`OutboxStore.claim`.

        Returns:
            The records leased to ``owner``, in insertion order (the others are not returned).

        Raises:
            ConcurrencyConflict: As :meth:`SagaStore.save`.
            DuplicateMessage: As :meth:`SagaStore.save`.
            StoreError: As :meth:`SagaStore.save`.
        """
        ...


@runtime_checkable
class DeadlineStore(Protocol):
    """Finds sagas whose next deadline has passed, and lets competing workers share them.

    Deadline claims are a hint that keeps competing timeout services off each other's sagas;
    they are never what makes a deadline fire once. That is the optimistic version check of
    :meth:`SagaStore.save`: a worker that fires a deadline another worker already fired
    reloads, finds it no longer due, and changes nothing. So a claim may expire while its
    owner still works (the two then race, safely), and a worker killed while holding claims
    loses nothing: once the lease has passed, another worker claims those sagas and fires them.
    A lease is measured on the claimers' clocks, so it must be longer than their skew.
    """

    async def due(self, now: datetime, limit: int) -> list[SagaInstance]:
        """Return up to ``limit`` active sagas with ``next_deadline_at <= now``, earliest first.

        Claims are ignored: this is the view of readers, tests and single workers.
        """
        ...

    async def claim_due(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta
    ) -> list[SagaInstance]:
        """Claim up to ``limit`` due sagas for ``owner`` until ``now + lease``, earliest first.

        Returns active sagas with ``next_deadline_at <= now`` that no other owner holds a live
        claim on (a claim is live while ``now < claimed_until``), and records the claim, so
        concurrent callers with different owners get disjoint sets. An owner's own live claims
        are returned again (and extended). Writing a saga's row (:meth:`SagaStore.save`, unless
        the change only appends history, outbox or inbox rows) releases its claim: the deadline
        that was claimed has moved, and the next one may be taken by anyone. See the class
        docstring for why an expired or abandoned claim never loses a deadline.
        """
        ...


@runtime_checkable
class SagaRepository(SagaStore, SagaReader, OutboxStore, DeadlineStore, Protocol):
    """A complete state backend: what the orchestrator, relay and timeout service need.

    The ports stay separate so each can be tested and replaced alone; a backend usually
    implements all of them over one database.
    """


MessageHandler = Callable[["Envelope"], Awaitable[None]]
"""Handles one delivered message. Returning acks it; raising hands it back for redelivery."""


@runtime_checkable
class Subscription(Protocol):
    """A running consumer."""

    async def close(self) -> None:
        """Stop consuming; messages being handled finish first."""
        ...


@runtime_checkable
class MessageBus(Protocol):
    """Publishes envelopes with confirmation and delivers them to handlers (ack after handling).

    Delivery is at least once: a handler may see a message again (after a crash, a lost ack,
    a redelivery), so every receiver deduplicates on ``message_id``.
    """

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish envelopes and wait until the bus has accepted every one.

        Raises:
            PublishError: At least one envelope was not accepted (unroutable, rejected, timed
                out). Others may have been; publishing again is safe.
        """
        ...

    async def subscribe(
        self,
        route: RouteKind,
        key: str,
        handler: MessageHandler,
        *,
        concurrency: int = 1,
    ) -> Subscription:
        """Consume messages sent to ``route``/``key`` (for events, ``key`` is a topic pattern).

        Up to ``concurrency`` messages are handled at once. A handler that returns acks the
        message; one that raises has it redelivered, a bounded number of times, after which the
        message goes to the dead-letter queue. Two failures are not the message's to count:

        - ``MessageDecodeError``: the message breaks the protocol and always will. It goes to
          the dead-letter queue at once, with the error in an ``x-dead-letter-reason`` header.
        - ``StoreUnavailable``: the handler's store cannot be reached. The message is held
          (not redelivered, not counted) and handled again once the store answers; the
          subscription's other messages wait meanwhile.
        """
        ...

    async def close(self) -> None:
        """Stop every subscription and release connections."""
        ...


@runtime_checkable
class Clock(Protocol):
    """The source of time; injected so tests control it."""

    def now(self) -> datetime:
        """Return the current time, timezone-aware, in UTC."""
        ...


# ---------------------------------------------------------------- participant side


@dataclass(frozen=True, slots=True)
class CachedOutcome:
    """The final outcome of a command, kept to answer its duplicates and retries."""

    status: ReplyStatus
    data: dict[str, Any]
    error: ErrorInfo | None = None


@runtime_checkable
class IdempotencyStore(Protocol):
    """Remembers final outcomes by idempotency key, and which steps were compensated."""

    async def get(self, key: str) -> CachedOutcome | None:
        """The outcome recorded for ``key``, if any."""
        ...

    async def put(self, key: str, outcome: CachedOutcome) -> None:
        """Record the final outcome for ``key``."""
        ...


@runtime_checkable
class UnitOfWork(Protocol):
    """One transaction of a :class:`TransactionalIdempotencyStore`, around one command.

    The handler's own writes (through :attr:`resources`) and the outcome commit together, or
    not at all: a participant that crashes mid-handler applied nothing and recorded nothing, and
    the redelivered command runs again.
    """

    resources: Mapping[type, object]
    """What handlers may ask for by annotation (for SQL: the transaction's connection)."""

    async def lock(self, key: str) -> None:
        """Serialize with every other unit of work on ``key`` (across processes), until the end."""
        ...

    async def get(self, key: str) -> CachedOutcome | None:
        """The outcome recorded for ``key``, read inside this transaction."""
        ...

    async def put(self, key: str, outcome: CachedOutcome) -> None:
        """Record ``outcome`` for ``key`` in this transaction."""
        ...


@runtime_checkable
class TransactionalIdempotencyStore(IdempotencyStore, Protocol):
    """An idempotency store that can run a handler and record its outcome in one transaction."""

    @property
    def resource_types(self) -> frozenset[type]:
        """The types its units of work hand to handlers (the keys of ``resources``)."""
        ...

    def unit_of_work(self) -> contextlib.AbstractAsyncContextManager[UnitOfWork]:
        """Begin a transaction: it commits when the block ends normally, else rolls back."""
        ...
