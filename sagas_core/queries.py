"""Reading sagas: one saga, a filtered list, the history, and waiting for a saga to settle.

Nothing here writes. :meth:`SagaQueries.wait_for` polls the store, and is woken early by
:meth:`SagaQueries.committed`, a commit listener of the orchestrator's unit of work.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sagas_abstractions import SagaNotFound, SagaStatus

if TYPE_CHECKING:
    import builtins
    from collections.abc import Sequence
    from datetime import datetime

    from sagas_abstractions import HistoryEntry, SagaInstance, SagaReader

__all__ = ["SagaQueries"]

# Asked on every commit: set membership instead of the ``is_active`` property's call.
_ACTIVE = frozenset(status for status in SagaStatus if status.is_active)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class SagaQueries:
    """Reads sagas from the store, and waits for them to settle.

    Args:
        store: What the sagas are read from.
    """

    def __init__(self, store: SagaReader) -> None:
        self.store = store
        # Futures of wait_for callers, by saga id: a commit that settles a saga (no longer
        # active) wakes the waiters of that saga only.
        self._waiters: dict[str, builtins.list[asyncio.Future[None]]] = {}

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

        Wakes when a commit this object is told of (:meth:`committed`) settles the saga, and
        polls the store (so it sees other workers' commits too).

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
        """Wait until a commit settles the saga, or ``poll_interval`` passes."""
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

    def committed(self, instances: Sequence[SagaInstance]) -> None:
        """Commit listener: wake the :meth:`wait_for` callers of each saga that settled."""
        if self._waiters:
            for instance in instances:
                # wait_for waits for a saga to settle: an active saga's waiters stay asleep.
                if instance.status not in _ACTIVE:
                    for waiter in self._waiters.pop(instance.saga_id, ()):
                        _wake(waiter)
