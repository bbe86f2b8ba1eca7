"""Sagas the orchestrator cannot decide: parked as failed, or closed by hand.

A stored saga whose row does not parse, whose type is not registered or whose definition
changed since it started (:data:`UNDECIDABLE`) cannot go through the engine. The message that
found it is not redelivered forever: the saga is parked as failed (its deadlines cleared) with
that message recorded, and an operator can still resolve it. Both are written from the row as
readers see it (``status_only``), through the orchestrator's unit of work.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sagas_abstractions import (
    ConcurrencyConflict,
    DefinitionChanged,
    DuplicateMessage,
    ErrorInfo,
    HistoryEntry,
    InvalidSagaData,
    SagaChange,
    SagaNotFound,
    SagaStatus,
    UnknownSagaType,
)
from sagas_core.engine import parked, resolved_without_definition
from sagas_core.unit_of_work import Again

if TYPE_CHECKING:
    from collections.abc import Callable

    from sagas_abstractions import Clock, InboxEntry, Resolve, SagaError, SagaInstance
    from sagas_core.changes import ChangeBuilder
    from sagas_core.engine import Decision
    from sagas_core.telemetry import Telemetry
    from sagas_core.unit_of_work import SagaUnitOfWork

__all__ = ["UNDECIDABLE", "Parking", "Undecidable"]

_log = logging.getLogger("sagas.orchestrator")

UNDECIDABLE = (InvalidSagaData, UnknownSagaType, DefinitionChanged)
"""What keeps the orchestrator from deciding a stored saga: it parks that saga instead."""

Undecidable = InvalidSagaData | UnknownSagaType | DefinitionChanged
"""One of :data:`UNDECIDABLE`, as a type."""


class Parking:
    """Parks the sagas the orchestrator cannot decide, and resolves them without a definition.

    Args:
        unit_of_work: Loads and saves the sagas, with conflict retry.
        changes: Makes the change of each decision.
        clock: The source of time.
        telemetry: Counts each park.
        observe: Told of a committed operator decision (what the orchestrator tells the
            telemetry and the breaker of every decision it commits).
    """

    def __init__(
        self,
        unit_of_work: SagaUnitOfWork,
        changes: ChangeBuilder,
        *,
        clock: Clock,
        telemetry: Telemetry,
        observe: Callable[[Decision], None],
    ) -> None:
        self.unit_of_work = unit_of_work
        self.changes = changes
        self.clock = clock
        self.telemetry = telemetry
        self.observe = observe

    async def park(
        self,
        saga_id: str,
        problem: Undecidable,
        *,
        inbox: InboxEntry | None,
        message_id: str | None = None,
    ) -> int:
        """Park a saga that cannot be decided and record the message that found it.

        Returns:
            1 if the saga was parked now, else 0 (already parked or finished, gone, or parked
            by another worker first).

        Raises:
            ConcurrencyConflict: The conflicts outlasted the retries.
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
            change = self.changes.change(
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
        change = SagaChange(
            instance=instance, expected_version=instance.version, history=[entry], inbox=inbox
        )
        # Straight to the store: a stale row written as it was read, never kept in memory.
        with contextlib.suppress(DuplicateMessage, ConcurrencyConflict):
            await self.unit_of_work.store.save([change])

    async def resolve(self, saga_id: str, event: Resolve) -> Decision:
        """Close a saga by hand without its definition (one that cannot be decided).

        Raises:
            SagaNotFound: No saga has this id.
            ConcurrencyConflict: The conflicts outlasted the retries.
        """
        uow = self.unit_of_work

        async def attempt() -> Decision | Again:
            instance, _ = await uow.view(saga_id)
            if instance is None:
                raise SagaNotFound("no saga with this id", saga_id=saga_id)
            decision = resolved_without_definition(instance, event)
            change = self.changes.change(
                decision, expected_version=instance.version, inbox=None, status_only=True
            )
            try:
                await uow.save(change)
            except ConcurrencyConflict:
                return Again.CONFLICT
            uow.committed([decision.instance])
            self.observe(decision)
            return decision

        return await uow.run(attempt, saga_id=saga_id)
