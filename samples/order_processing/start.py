"""Start the demo orders on a running worker: ``python -m samples.order_processing.start``.

For the sample deployed as processes (``sagas worker samples.order_processing.host:host`` and
its participants, see the README): this only writes the sagas to the database configured by
``SAGAS_DATABASE_URL`` (and ``SAGAS_TABLE_PREFIX``); the worker's outbox relay publishes their
first commands and drives them. Order ids get a random suffix, so it can run again.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from sagas_core import Orchestrator, SystemClock, close_store, load_settings
from sagas_core.host import open_settings_store
from samples.order_processing.demo import scenarios
from samples.order_processing.saga import order_saga


async def start_and_wait(timeout: float = 60.0) -> int:
    """Start every scenario's order, wait for each to settle, print it; 0 if all as expected."""
    settings = load_settings()
    store = await open_settings_store(settings)
    suffix = uuid.uuid4().hex[:6]
    try:
        orchestrator = Orchestrator(
            store=store, definitions=[order_saga], clock=SystemClock(), group=settings.group
        )
        started = []
        for scenario in scenarios():
            order = scenario.order.model_copy(
                update={"order_id": f"{scenario.order.order_id}-{suffix}"}
            )
            saga = await orchestrator.start(order_saga, order, saga_id=order.order_id)
            started.append((scenario, saga.saga_id))
        failures = 0
        for scenario, saga_id in started:
            done = await orchestrator.wait_for(saga_id, timeout=timeout)
            error = f"  ({done.error.code})" if done.error else ""
            mark = "ok" if done.status is scenario.expected else "UNEXPECTED"
            failures += done.status is not scenario.expected
            print(f"{saga_id:<14} {scenario.name:<30} {done.status.value:<12} {mark}{error}")
        return 1 if failures else 0
    finally:
        await close_store(store)


if __name__ == "__main__":
    sys.exit(asyncio.run(start_and_wait()))
