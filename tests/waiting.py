"""How the suite waits: on the state that matters, never on a sleep or a neighbour's state.

``eventually`` polls a condition (sync or async) until it holds; its ``timeout`` is an upper bound
for a hang, not the synchronisation, so it is generous and a test never fails by being slow.
``saga_reaches`` waits on one saga's own row in the store: when a test's next action depends on a
saga (an event that must find it, a cancellation that must meet it), it waits for *that* saga, as
the product promises no order between different sagas, queues or topics. See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from sagas_abstractions import SagaInstance, SagaStatus, SagaStore

T = TypeVar("T")

WAIT = 30.0
"""Default upper bound, in seconds, for a wait that should end in milliseconds."""


@overload
async def eventually(
    condition: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...
@overload
async def eventually(
    condition: Callable[[], T | None],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...
async def eventually(
    condition: Callable[[], Any],
    *,
    timeout: float = WAIT,
    interval: float = 0.01,
    what: str = "the condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises:
        TimeoutError: it never held within ``timeout`` seconds; the message names ``what``.
    """
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(interval)
    except TimeoutError as exc:
        raise TimeoutError(f"{what} did not hold within {timeout:g} s") from exc


async def saga_reaches(
    store: SagaStore,
    saga_id: str,
    *statuses: SagaStatus,
    step: str | None = None,
    timeout: float = WAIT,
) -> SagaInstance:
    """Wait until the saga exists with one of ``statuses`` (and at ``step``, if given)."""
    last: list[SagaInstance | None] = [None]

    async def reached() -> SagaInstance | None:
        saga = last[0] = await store.load(saga_id)
        if saga is None or saga.status not in statuses:
            return None
        if step is not None and saga.current_step_name != step:
            return None
        return saga

    wanted = "/".join(status.value for status in statuses) + (f" at step {step!r}" if step else "")
    try:
        return await eventually(reached, timeout=timeout, interval=0.02, what=f"{saga_id} {wanted}")
    except TimeoutError as exc:
        saga = last[0]
        where = (
            "not found" if saga is None else f"{saga.status.value} at {saga.current_step_name!r}"
        )
        raise TimeoutError(f"{exc} (last seen: {where})") from None
