"""Compare save() throughput of the SQL store through psycopg 3 and asyncpg (and SQLite).

Usage: ``python bench/store_drivers.py [postgresql://user@host/db] [--sagas N] [--concurrency C]``

Each saga is inserted and then moved through three updates, each save carrying a history row,
an outbox record and an inbox row: the shape of the orchestrator's unit of work. Saves run
``concurrency`` at a time (one task per saga), like a worker handling several messages at once.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sagas_abstractions import (
    Envelope,
    HistoryEntry,
    InboxEntry,
    RouteKind,
    SagaChange,
    SagaInstance,
    SagaStatus,
    StepState,
)
from sagas_sqlalchemy import create_store

T0 = datetime(2030, 1, 1, tzinfo=UTC)
UPDATES = 3


def _instance(saga_id: str, version: int) -> SagaInstance:
    return SagaInstance(
        saga_id=saga_id,
        saga_type="bench",
        definition_version="fp",
        status=SagaStatus.RUNNING,
        current_step=version - 1,
        data={"order_id": saga_id, "lines": [{"sku": "A-1", "qty": 2}], "total": "12.30"},
        steps=tuple(StepState(name=f"s{n}") for n in range(UPDATES + 1)),
        version=version,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=version),
        deadline_at=T0 + timedelta(seconds=version + 10),
    )


def _change(saga_id: str, version: int) -> SagaChange:
    instance = _instance(saga_id, version)
    envelope = Envelope(
        route=RouteKind.COMMAND,
        key="inventory",
        message_id=f"{saga_id}:{version}",
        message_type="Reserve",
        correlation_id=saga_id,
        headers={"x-saga-type": "bench"},
        body=b'{"order_id": "x", "sku": "A-1", "qty": 2}',
        timestamp=T0,
    )
    history = HistoryEntry(
        saga_id=saga_id, version=version, at=T0, input="StepSucceeded", to_status=instance.status
    )
    return SagaChange(
        instance=instance,
        expected_version=None if version == 1 else version - 1,
        outbox=[envelope],
        history=[history],
        inbox=InboxEntry("bench", f"{saga_id}:in:{version}"),
    )


async def measure(url: str, sagas: int, concurrency: int) -> float:
    store = create_store(
        url,
        table_prefix=f"bench_{uuid.uuid4().hex[:8]}_",
        create_tables=True,
        pool_size=concurrency,
    )
    gate = asyncio.Semaphore(concurrency)

    async def one(saga_id: str) -> None:
        async with gate:
            for version in range(1, UPDATES + 2):
                await store.save([_change(saga_id, version)])

    try:
        await store.initialize()
        await one("warm-up")
        started = time.perf_counter()
        await asyncio.gather(*(one(f"saga-{n}") for n in range(sagas)))
        elapsed = time.perf_counter() - started
    finally:
        await store.drop_tables()
        await store.close()
    return sagas * (UPDATES + 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", nargs="?", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sagas", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    base = args.url.split("://", 1)[1]
    with tempfile.TemporaryDirectory() as directory:
        targets = {
            "psycopg": f"postgresql+psycopg://{base}",
            "asyncpg": f"postgresql+asyncpg://{base}",
            "sqlite": f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}",
        }
        for concurrency in (1, args.concurrency):
            for name, url in targets.items():
                rate = asyncio.run(measure(url, args.sagas, concurrency))
                print(f"{name:8} concurrency={concurrency:<3} {rate:8.0f} saves/s")


if __name__ == "__main__":
    main()
