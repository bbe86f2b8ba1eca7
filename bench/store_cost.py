"""Database CPU per saga transition on PostgreSQL: what the server spends on our writes.

Usage: ``python -m bench.store_cost [--sagas N] [--concurrency C] [--rounds R]``

Drives the SQL store alone (psycopg hot path, group commit, no broker) with the writes of the
throughput bench's 3-step saga, message for message: a start (command + ``started`` event), two
replies (inbox row, next command + ``step_completed``), the last reply (``step_completed`` +
``completed``), a history row each, and every outbox record marked sent afterwards as the relay
does. Reports the CPU time of this run's own PostgreSQL backends (found by application name,
read from /proc) per transition, and this process's, so other work on the machine does not
blur the number the way the wall clock would. Only meaningful with PostgreSQL on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.support.measure import DATABASE_URL, cpu_seconds, load_average
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
from sagas_sqlalchemy import SqlSagaStore, create_store

T0 = datetime(2030, 1, 1, tzinfo=UTC)
STEPS = ("reserve", "pay", "ship")


def _instance(saga_id: str, version: int, status: SagaStatus) -> SagaInstance:
    return SagaInstance(
        saga_id=saga_id,
        saga_type="bench-remote",
        definition_version="fp",
        status=status,
        current_step=min(version - 1, len(STEPS) - 1),
        data={"order_id": saga_id, "amount": 10, "reservation": "r-1", "payment": "p-1"},
        steps=tuple(StepState(name=name) for name in STEPS),
        version=version,
        created_at=T0,
        updated_at=T0 + timedelta(milliseconds=version),
        deadline_at=T0 + timedelta(seconds=30 + version) if status.is_active else None,
    )


def _envelope(saga_id: str, version: int, route: RouteKind, kind: str) -> Envelope:
    return Envelope(
        route=route,
        key=f"bench.{kind}" if route is RouteKind.EVENT else kind,
        message_id=f"{saga_id}:{version}:{kind}",
        message_type="SagaEvent" if route is RouteKind.EVENT else kind.title(),
        correlation_id=saga_id,
        reply_to=None if route is RouteKind.EVENT else "orchestrator",
        headers={
            "x-saga-type": "bench-remote",
            "x-saga-step": kind,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        body=(
            b'{"event_id":"' + saga_id.encode() + b'","kind":"' + kind.encode() + b'",'
            b'"status":"running","version":1,"at":"2030-01-01T00:00:00Z"}'
        ),
        timestamp=T0,
    )


def transitions(saga_id: str) -> list[SagaChange]:
    """The four changes of one happy 3-step saga, as the orchestrator writes them."""
    changes = []
    for version in range(1, len(STEPS) + 2):
        last = version == len(STEPS) + 1
        status = SagaStatus.COMPLETED if last else SagaStatus.RUNNING
        outbox = []
        if not last:
            outbox.append(_envelope(saga_id, version, RouteKind.COMMAND, STEPS[version - 1]))
        outbox.append(_envelope(saga_id, version, RouteKind.EVENT, "step_completed"))
        if version == 1 or last:
            outbox.append(_envelope(saga_id, version, RouteKind.EVENT, "lifecycle"))
        changes.append(
            SagaChange(
                instance=_instance(saga_id, version, status),
                expected_version=None if version == 1 else version - 1,
                outbox=outbox,
                history=[
                    HistoryEntry(
                        saga_id=saga_id,
                        version=version,
                        at=T0,
                        input="Start" if version == 1 else "StepReply",
                        to_status=status,
                    )
                ],
                inbox=None if version == 1 else InboxEntry("orchestrator", f"{saga_id}:r{version}"),
            )
        )
    return changes


async def _query(sql: str, *params: object) -> list[tuple[Any, ...]]:
    url = DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(sql, params)
        return list(await cursor.fetchall())


async def backend_pids(application: str) -> list[int]:
    rows = await _query("SELECT pid FROM pg_stat_activity WHERE application_name = %s", application)
    return [int(row[0]) for row in rows]


async def wal_position() -> int:
    """The server's WAL insert position in bytes (all databases: keep the machine quiet)."""
    rows = await _query("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return int(rows[0][0])


def backends_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue  # closed meanwhile
    return total


async def run(store: SqlSagaStore, sagas: int, concurrency: int, tag: str) -> None:
    gate = asyncio.Semaphore(concurrency)
    unmarked: list[int] = []

    async def one(index: int) -> None:
        async with gate:
            for change in transitions(f"{tag}-{index}"):
                records = await store.save_leased(
                    [change], owner="relay", until=T0 + timedelta(minutes=5)
                )
                unmarked.extend(record.id for record in records)

    async def marker(done: asyncio.Event) -> None:
        while not done.is_set() or unmarked:
            if unmarked:
                ids = unmarked[:]
                del unmarked[: len(ids)]
                await store.mark_sent(ids, now=T0)
            else:
                await asyncio.sleep(0.001)

    done = asyncio.Event()
    marking = asyncio.create_task(marker(done))
    await asyncio.gather(*(one(index) for index in range(sagas)))
    done.set()
    await marking


async def measure(sagas: int, concurrency: int) -> dict[str, float]:
    application = f"sagas-store-cost-{uuid.uuid4().hex[:8]}"
    url = DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    separator = "&" if "?" in url else "?"
    store = create_store(
        f"{url}{separator}application_name={application}",
        table_prefix=f"cost_{uuid.uuid4().hex[:8]}_",
        create_tables=True,
        pool_size=16,
    )
    try:
        await store.initialize()
        await run(store, max(concurrency * 2, 20), concurrency, "warm")
        pids = await backend_pids(application)
        db_before, us_before, wal_before = backends_cpu(pids), cpu_seconds(), await wal_position()
        began = time.perf_counter()
        await run(store, sagas, concurrency, "measured")
        elapsed = time.perf_counter() - began
        db, us = backends_cpu(pids) - db_before, cpu_seconds() - us_before
        wal = await wal_position() - wal_before
        extra = sorted(set(await backend_pids(application)) - set(pids))
        assert await store.pending_count() == 0
    finally:
        await store.drop_tables()
        await store.close()
    count = sagas * (len(STEPS) + 1)
    return {
        "transitions/s": count / elapsed,
        "db us/transition": db / count * 1e6,
        "client us/transition": us / count * 1e6,
        "WAL bytes/transition": wal / count,
        "backends": float(len(pids)),
        "backends opened during the run": float(len(extra)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"pid {os.getpid()} load {load_average()}")
    for _ in range(args.rounds):
        for level in (int(value) for value in args.concurrency.split(",")):
            result = asyncio.run(measure(args.sagas, level))
            shown = "  ".join(f"{name} {value:,.1f}" for name, value in result.items())
            print(f"concurrency {level:>3}  {shown}")


if __name__ == "__main__":
    main()
