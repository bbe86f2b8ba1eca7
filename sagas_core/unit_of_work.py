"""One saga's unit of work: load it, let the caller decide, save with a version check, retry.

The orchestrator translates each input (start, reply, event, deadline, operator action, park)
into one :meth:`SagaUnitOfWork.run`: an *attempt* takes the saga (the kept copy,
:meth:`SagaUnitOfWork.kept_copy`, when the instance cache holds it, else
:meth:`SagaUnitOfWork.load`), decides, and saves (:meth:`SagaUnitOfWork.save`). A save refused
by the version check makes the attempt return :meth:`SagaUnitOfWork.conflict`'s verdict, and
:meth:`SagaUnitOfWork.run` runs it again on a fresh load, with a short random wait, a bounded
number of times. Only this module keeps instances in memory, decides when a kept instance has
gone stale, hands outbox records to the relay and tells commit listeners what was committed.
(Not the participant's ``UnitOfWork``, the idempotency store's transaction.)
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    InvalidSagaData,
    SagaChange,
    SagaInstance,
    SagaRepository,
    SagaStatus,
)
from sagas_abstractions.ports import OutboxHandoff

if TYPE_CHECKING:
    from sagas_abstractions import Clock
    from sagas_core.relay import OutboxRelay

__all__ = ["Again", "CommitListener", "SagaUnitOfWork"]

_log = logging.getLogger("sagas.orchestrator")

T = TypeVar("T")

CommitListener = Callable[[Sequence[SagaInstance]], None]
"""Called after every commit with the instances it wrote (must not raise, must not block)."""

_ACTIVE = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})


class Again(Enum):
    """What an attempt returns to be run again (see :meth:`SagaUnitOfWork.run`)."""

    CONFLICT = "conflict"
    """The save met a version conflict: counted, waited for, then loaded afresh."""
    RELOAD = "reload"
    """What was kept in memory cannot be trusted (it went stale): loaded afresh, not counted."""


# Asked after every attempt: a module constant instead of the class lookup of the enum member.
_RELOAD = Again.RELOAD


class SagaUnitOfWork:
    """Loads, saves and retries sagas for one orchestrator, and keeps the active ones it saved.

    Args:
        store: The state backend.
        clock: The source of time (the relay's lease starts at a save).
        max_conflict_retries: How often a version conflict is reloaded and reapplied.
        instance_cache: How many active sagas it saved last are kept in memory (least recently
            saved out first); 0 loads every time.

    Attributes:
        conflicts: Version conflicts met so far (each reloaded and reapplied).
        stale_cache: Saves refused because a kept instance had gone stale (another worker moved
            the saga on): reloaded, not counted as conflicts.
    """

    def __init__(
        self,
        store: SagaRepository,
        *,
        clock: Clock,
        max_conflict_retries: int = 20,
        instance_cache: int = 0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_conflict_retries = max_conflict_retries
        self.instance_cache = max(0, instance_cache)
        self.conflicts = 0
        self.stale_cache = 0
        self._instances: OrderedDict[str, SagaInstance] = OrderedDict()
        self._relay: OutboxRelay | None = None
        self._handoff: OutboxHandoff | None = None
        self._listeners: list[CommitListener] = []

    # ------------------------------------------------------------------ wiring

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener`` after every commit."""
        self._listeners.append(listener)

    def use_relay(self, relay: OutboxRelay) -> None:
        """Hand what each commit wrote to the outbox to ``relay``, this process's relay.

        When the store offers :class:`~sagas_abstractions.ports.OutboxHandoff`, the records are
        written already leased to the relay and handed to it in memory, so it publishes them
        without a claim query (the claim stays the recovery path, should this process die
        before publishing). Otherwise, and for records it could not lease, the relay is kicked
        to claim them.
        """
        self._relay = relay
        # Checked once here: a runtime-checkable protocol is slow to check on every save.
        self._handoff = self.store if isinstance(self.store, OutboxHandoff) else None

    # ------------------------------------------------------------------ the loop

    async def run(
        self,
        attempt: Callable[[], Awaitable[T | Again]],
        *,
        saga_id: str,
        saga_type: str | None = None,
    ) -> T:
        """Run ``attempt`` until it returns something other than :class:`Again`.

        Raises:
            ConcurrencyConflict: The conflicts outlasted ``max_conflict_retries``.
        """
        conflicts = 0
        # A reload follows an instance dropped from memory, so the next load reads the store:
        # at most one per conflict round, but bounded anyway.
        reloads = 0
        while conflicts <= self.max_conflict_retries and reloads <= self.max_conflict_retries:
            outcome = await attempt()
            if not isinstance(outcome, Again):
                return outcome
            if outcome is _RELOAD:
                reloads += 1
                continue
            self.conflicts += 1
            await asyncio.sleep(random.uniform(0, 0.002 * (conflicts + 1)))  # noqa: S311
            conflicts += 1
        raise ConcurrencyConflict(
            saga_id=saga_id, expected_version=None, actual_version=None, saga_type=saga_type
        )

    def conflict(self, *, kept: bool) -> Again:
        """What an attempt whose save met a version conflict returns.

        A kept instance that went stale is no contention: it is reloaded without counting.
        """
        if kept:
            self.stale_cache += 1
            return Again.RELOAD
        return Again.CONFLICT

    # ------------------------------------------------------------------ loading

    def kept_copy(self, saga_id: str) -> SagaInstance | None:
        """The instance of ``saga_id`` kept in memory, if any (else :meth:`load` it).

        Not a coroutine: a kept copy is most inputs' instance, and it needs no waiting.
        """
        return self._instances.get(saga_id)

    async def load(self, saga_id: str) -> SagaInstance | None:
        """The saga from the store (``None``: no such saga)."""
        return await self.store.load(saga_id)

    async def view(self, saga_id: str) -> tuple[SagaInstance | None, bool]:
        """The saga from the store, or as readers show it when its state does not parse.

        Returns:
            The instance (``None``: no such saga) and whether it parsed.
        """
        try:
            return await self.store.load(saga_id), True
        except InvalidSagaData:
            return await self.store.get(saga_id), False

    def forget(self, saga_id: str) -> None:
        """Drop the kept copy of ``saga_id``, if any (the next load reads the store)."""
        self._instances.pop(saga_id, None)

    @property
    def kept(self) -> list[str]:
        """Ids of the sagas kept in memory, least recently saved first."""
        return list(self._instances)

    # ------------------------------------------------------------------ saving

    async def save(self, change: SagaChange) -> bool:
        """Save one change and keep its saga in memory (unless finished or written partially).

        A change written from a partial view of its row (``status_only``) is saved as it is and
        nothing of it is kept. Otherwise the outbox records go to the relay in hand when it can
        lease them.

        Returns:
            Whether the relay got every outbox record in hand (nothing for it to claim).

        Raises:
            ConcurrencyConflict: The version check refused the change (nothing was written).
            DuplicateMessage: The inbox holds the change's message already (nothing written).
        """
        saga_id = change.instance.saga_id
        if change.status_only:
            self._instances.pop(saga_id, None)
            await self.store.save([change])
            return False
        relay, handoff = self._relay, self._handoff
        try:
            if relay is None or handoff is None or not change.outbox or not relay.accepts_hand_off:
                await self.store.save([change])
                handed = not change.outbox
            else:
                until = self.clock.now() + relay.lease
                leased = await handoff.save_leased([change], owner=relay.owner, until=until)
                relay.hand_off(leased)
                handed = len(leased) == len(change.outbox)
        except DuplicateMessage:
            raise  # nothing was written, and the version matched: what is kept still holds
        except BaseException:
            self._instances.pop(saga_id, None)
            raise
        self._keep(change.instance)
        return handed

    def _keep(self, instance: SagaInstance) -> None:
        saga_id = instance.saga_id
        if not self.instance_cache or instance.status not in _ACTIVE:
            self._instances.pop(saga_id, None)  # a finished saga seldom hears again
            return
        self._instances[saga_id] = instance
        self._instances.move_to_end(saga_id)
        if len(self._instances) > self.instance_cache:
            self._instances.popitem(last=False)

    def committed(self, instances: Sequence[SagaInstance], *, claim: bool = True) -> None:
        """After a commit: wake the relay, then tell the listeners.

        The relay is woken to claim, unless it got the records in hand (``claim=False``).
        """
        if claim and self._relay is not None:
            self._relay.kick()
        for listener in self._listeners:
            try:
                listener(instances)
            except Exception:  # noqa: BLE001 - a listener must not undo a committed change
                _log.exception("commit listener failed")
