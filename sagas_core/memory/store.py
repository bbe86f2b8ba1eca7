"""A real in-memory saga store: every port, with the same semantics as the SQL store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    Envelope,
    HistoryEntry,
    OutboxRecord,
    SagaChange,
    SagaInstance,
    SagaStatus,
    StoreError,
)
from sagas_core._models import trusted

if TYPE_CHECKING:
    import builtins
    from collections.abc import Sequence
    from datetime import datetime, timedelta

__all__ = ["InMemorySagaStore"]

_STATUS_FIELDS = ("status", "error", "wait", "deadline_at", "version", "updated_at")
"""The fields a ``status_only`` :class:`~sagas_abstractions.SagaChange` writes."""


@dataclass(slots=True)
class _OutboxRow:
    id: int
    saga_id: str
    envelope: Envelope
    created_at: datetime
    attempts: int = 0
    sent_at: datetime | None = None
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    available_at: datetime | None = None
    last_error: str | None = None


class InMemorySagaStore:
    """Keeps sagas, history, outbox and inbox in process memory.

    It implements :class:`~sagas_abstractions.SagaRepository` with the semantics of the SQL store
    (atomic ``save``, optimistic versions, inbox uniqueness, leased outbox and deadline
    claims), so tests and
    the embedded mode behave like production. Nothing survives the process.

    Tests can make the next ``save`` calls fail with :meth:`fail_next_saves`.
    """

    def __init__(self) -> None:
        self._sagas: dict[str, SagaInstance] = {}
        # Next deadline of each saga that has one: the timeout service polls often, and a scan
        # of every saga ever stored grows with the store.
        self._deadlines: dict[str, datetime] = {}
        self._history: dict[str, list[HistoryEntry]] = {}
        self._outbox: dict[int, _OutboxRow] = {}
        self._pending: dict[int, _OutboxRow] = {}  # unsent rows, in id (insertion) order
        self._pending_by_saga: dict[str, dict[int, _OutboxRow]] = {}  # the same, per saga
        self._inbox: set[tuple[str, str]] = set()
        self._claims: dict[str, tuple[str, datetime]] = {}  # saga id -> (owner, claimed until)
        self._next_outbox_id = 1
        self._failures: list[BaseException] = []

    # ------------------------------------------------------------------ test hooks

    def fail_next_saves(self, count: int = 1, error: BaseException | None = None) -> None:
        """Make the next ``count`` calls to :meth:`save` raise (nothing is written)."""
        self._failures.extend([error or StoreError("injected store failure")] * count)

    @property
    def outbox_rows(self) -> builtins.list[OutboxRecord]:
        """Every outbox record, sent or not (for assertions)."""
        return [self._record(row) for row in self._outbox.values()]

    # ------------------------------------------------------------------ SagaStore

    async def load(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``."""
        return self._sagas.get(saga_id)

    async def save(self, changes: Sequence[SagaChange]) -> None:
        """Write all changes atomically (validated first, then applied)."""
        self._write(changes)

    def _write(self, changes: Sequence[SagaChange]) -> None:
        # Synchronous from the first check to the last write: nothing else runs in between, so
        # every save (and every claim) is atomic without a lock.
        if self._failures:
            raise self._failures.pop(0)
        seen_inbox = self._checked(changes)
        sagas = self._sagas
        for change in changes:
            instance = change.instance
            saga_id = instance.saga_id
            expected = change.expected_version
            if change.status_only:
                instance = sagas[saga_id].model_copy(
                    update={field: getattr(instance, field) for field in _STATUS_FIELDS}
                )
            if expected is None or instance.version > expected:
                sagas[saga_id] = instance
                self._claims.pop(saga_id, None)  # the claimed deadline has moved
                deadline = instance.next_deadline_at
                if deadline is None:
                    self._deadlines.pop(saga_id, None)
                else:
                    self._deadlines[saga_id] = deadline
            if change.history:
                history = self._history.get(saga_id)
                if history is None:
                    self._history[saga_id] = list(change.history)
                else:
                    history.extend(change.history)
            if change.outbox:
                self._append_outbox(saga_id, change.outbox, instance.updated_at)
        if seen_inbox:
            self._inbox.update(seen_inbox)

    def _checked(self, changes: Sequence[SagaChange]) -> builtins.list[tuple[str, str]]:
        """Check every version and inbox entry of ``changes``; returns the inbox keys to add."""
        seen_inbox: list[tuple[str, str]] = []
        versions: dict[str, int] = {}
        for change in changes:
            instance = change.instance
            saga_id = instance.saga_id
            if saga_id in versions:
                stored: int | None = versions[saga_id]
            else:
                row = self._sagas.get(saga_id)
                stored = None if row is None else row.version
            expected = change.expected_version
            if expected is None:
                if change.status_only:
                    raise ValueError("a status_only change updates a saga: set expected_version")
                if stored is not None:
                    raise ConcurrencyConflict(
                        saga_id=saga_id,
                        expected_version=None,
                        actual_version=stored,
                        saga_type=instance.saga_type,
                    )
            elif stored != expected:
                raise ConcurrencyConflict(
                    saga_id=saga_id,
                    expected_version=expected,
                    actual_version=stored,
                    saga_type=instance.saga_type,
                )
            versions[saga_id] = instance.version
            entry = change.inbox
            if entry is not None:
                key = (entry.consumer, entry.message_id)
                if key in self._inbox or key in seen_inbox:
                    raise DuplicateMessage(consumer=key[0], message_id=key[1], saga_id=saga_id)
                seen_inbox.append(key)
        return seen_inbox

    def _append_outbox(self, saga_id: str, outbox: Sequence[Envelope], at: datetime) -> None:
        of_saga = self._pending_by_saga.get(saga_id)
        if of_saga is None:
            of_saga = self._pending_by_saga[saga_id] = {}
        for envelope in outbox:
            row_id = self._next_outbox_id
            self._next_outbox_id = row_id + 1
            row = _OutboxRow(row_id, saga_id, envelope, at)
            self._outbox[row_id] = self._pending[row_id] = of_saga[row_id] = row

    async def save_leased(
        self, changes: Sequence[SagaChange], *, owner: str, until: datetime
    ) -> builtins.list[OutboxRecord]:
        """Save, and lease the new outbox records to ``owner`` where it holds their saga's others.

        See :class:`~sagas_abstractions.OutboxHandoff`.
        """
        first = self._next_outbox_id
        await self.save(changes)  # atomic; nothing runs between it and the leases below
        pending = self._pending
        leased: list[OutboxRecord] = []
        # Sagas whose every earlier unsent record is the owner's (their new records are leased).
        holds: dict[str, bool] = {}
        for row_id in range(first, self._next_outbox_id):
            row = pending[row_id]
            saga_id = row.saga_id
            held = holds.get(saga_id)
            if held is None:
                held = holds[saga_id] = self._holds(saga_id, owner, before=first)
            if held:
                row.claimed_by = owner
                row.claimed_until = until
                leased.append(self._record(row))
        return leased

    def _holds(self, saga_id: str, owner: str, *, before: int) -> bool:
        """Whether ``owner`` holds every unsent record of the saga with an id below ``before``."""
        for other in self._pending_by_saga[saga_id].values():  # in id order
            if other.id >= before:
                return True
            if other.claimed_by != owner:
                return False
        return True

    async def is_processed(self, consumer: str, message_id: str) -> bool:
        """Whether the inbox records this message id for this consumer."""
        return (consumer, message_id) in self._inbox

    # ------------------------------------------------------------------ SagaReader

    async def get(self, saga_id: str) -> SagaInstance | None:
        """Return the saga with this id, or ``None``."""
        return self._sagas.get(saga_id)

    async def find(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Sagas matching every given filter, least recently updated first."""
        found = [
            saga
            for saga in self._sagas.values()
            if (status is None or saga.status is status)
            and (saga_type is None or saga.saga_type == saga_type)
            and (updated_before is None or saga.updated_at < updated_before)
        ]
        found.sort(key=lambda saga: (saga.updated_at, saga.saga_id))
        return found[:limit]

    async def history(self, saga_id: str) -> builtins.list[HistoryEntry]:
        """The saga's audit trail, oldest first."""
        return list(self._history.get(saga_id, ()))

    # ------------------------------------------------------------------ DeadlineStore

    async def due(self, now: datetime, limit: int) -> builtins.list[SagaInstance]:
        """Active sagas whose next deadline has passed, earliest first."""
        due = [
            (deadline, self._sagas[saga_id])
            for saga_id, deadline in self._deadlines.items()
            if deadline <= now
        ]
        due.sort(key=lambda pair: (pair[0], pair[1].saga_id))
        return [saga for _, saga in due[:limit]]

    async def claim_due(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta
    ) -> builtins.list[SagaInstance]:
        """Claim due sagas nobody else holds a live claim on, earliest first."""
        due = [
            (deadline, self._sagas[saga_id])
            for saga_id, deadline in self._deadlines.items()
            if deadline <= now and self._claimable(saga_id, owner=owner, now=now)
        ]
        due.sort(key=lambda pair: (pair[0], pair[1].saga_id))
        claimed = [saga for _, saga in due[: max(limit, 0)]]
        for saga in claimed:
            self._claims[saga.saga_id] = (owner, now + lease)
        return claimed

    def _claimable(self, saga_id: str, *, owner: str, now: datetime) -> bool:
        claim = self._claims.get(saga_id)
        return claim is None or claim[0] == owner or claim[1] <= now

    # ------------------------------------------------------------------ OutboxStore

    async def claim(
        self, *, owner: str, limit: int, lease: timedelta, now: datetime
    ) -> builtins.list[OutboxRecord]:
        """Lease up to ``limit`` unsent records, oldest first, keeping each saga's order."""
        claimed: list[_OutboxRow] = []
        blocked: set[str] = set()
        for row in self._pending.values():
            if row.saga_id in blocked:
                continue
            leased_elsewhere = (
                row.claimed_until is not None
                and row.claimed_until > now
                and row.claimed_by != owner
            )
            waiting = row.available_at is not None and row.available_at > now
            if leased_elsewhere or waiting:
                blocked.add(row.saga_id)  # later messages of this saga must wait for it
                continue
            if len(claimed) >= limit:
                break
            row.claimed_by = owner
            row.claimed_until = now + lease
            claimed.append(row)
        return [self._record(row) for row in claimed]

    async def mark_sent(self, ids: Sequence[int], *, now: datetime) -> None:
        """Mark records as published."""
        for row_id in ids:
            row = self._pending.pop(row_id, None)
            if row is not None:
                of_saga = self._pending_by_saga[row.saga_id]
                del of_saga[row_id]
                if not of_saga:
                    del self._pending_by_saga[row.saga_id]
                row.sent_at = now
                row.claimed_by = None
                row.claimed_until = None

    async def release(self, ids: Sequence[int], *, retry_at: datetime, error: str) -> None:
        """Give records back after a failed publish, claimable again at ``retry_at``."""
        for row_id in ids:
            row = self._outbox.get(row_id)
            if row is not None and row.sent_at is None:
                row.attempts += 1
                row.available_at = retry_at
                row.last_error = error
                row.claimed_by = None
                row.claimed_until = None

    async def pending_count(self) -> int:
        """How many records wait to be published."""
        return len(self._pending)

    @staticmethod
    def _record(row: _OutboxRow) -> OutboxRecord:
        return trusted(
            OutboxRecord,
            {
                "id": row.id,
                "saga_id": row.saga_id,
                "envelope": row.envelope,
                "created_at": row.created_at,
                "attempts": row.attempts,
            },
        )
