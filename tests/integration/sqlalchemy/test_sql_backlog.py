"""The outbox claim and the hot statements after a burst: work bounded by the batch, not the table.

A store's connections keep the plans they made first, and those may be made while the outbox is
empty (a fresh table, a quiet minute). The claim then met a burst with a plan that scanned the
pending index once per record it looked at: quadratic in the backlog (issue 18: 26 s per batch
of 100 at 25k records). These tests plan every statement on empty tables, under
``plan_cache_mode = force_generic_plan`` and ``enable_seqscan = off`` as the store's own
connections do, then run it against a backlog of 50,000 records and count the buffers it
touched (``EXPLAIN (ANALYZE, BUFFERS)``), which must stay within a bound set by the batch size.
"""

# Statements are built from table names and constants only.
# ruff: noqa: S608

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from sagas_abstractions import InboxEntry
from sagas_core.telemetry import Telemetry
from sagas_sqlalchemy import SqlSagaStore
from sagas_sqlalchemy.engine import create_engine
from tests.contracts.store_contract import (
    T0,
    insert,
    make_envelope,
    make_instance,
    update,
)
from tests.integration.sqlalchemy.sql_support import unique_prefix

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE = timedelta(seconds=30)
BACKLOG = 50_000
SAGAS = 5_000  # ten records per saga, interleaved in id order as a burst writes them
BLOCKED = 500  # sagas whose first record another relay holds: a claim must pass them by
BATCH = 100
# Buffers a statement may touch per record of its batch: a claim reads a window of 8 unsent
# records per record it leases (an index entry and a probe each) and locks and updates what
# it leases. The plan made on an empty table touched hundreds of thousands per batch.
BUFFERS_PER_RECORD = 80

# Every session of the store plans on first use and keeps the plan, and tells us about it.
_SESSION_OPTIONS = " ".join(
    f"-c {name}={value}"
    for name, value in {
        "plan_cache_mode": "force_generic_plan",
        "enable_seqscan": "off",
        "session_preload_libraries": "auto_explain",
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_analyze": "on",
        "auto_explain.log_buffers": "on",
        "auto_explain.log_timing": "off",
        "auto_explain.log_format": "json",
        "auto_explain.log_level": "notice",
        # A guard only (the old claim ran for minutes here): the assertions count buffers.
        "statement_timeout": "60s",
    }.items()
)


class Explained:
    """The plans auto_explain sent as notices, on every connection of one engine."""

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []

    def notice(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        text = diagnostic.message_primary or ""
        start = text.find("{")
        if text.startswith("duration:") and start >= 0:
            self.plans.append(json.loads(text[start:]))

    def take(self) -> list[dict[str, Any]]:
        plans, self.plans = self.plans, []
        return plans


def buffers(plan: dict[str, Any]) -> int:
    """Shared buffers the statement touched (the top node counts its children's)."""
    top = plan["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


@pytest.fixture
async def planned_store(postgres_url: str) -> AsyncIterator[tuple[SqlSagaStore, Explained]]:
    """A psycopg store whose every connection prepares at once and keeps generic plans."""
    explained = Explained()
    url = sa.make_url(postgres_url).set(drivername="postgresql+psycopg")
    engine = create_engine(
        url,
        pool_size=1,
        max_overflow=0,
        connect_args={"prepare_threshold": 0, "options": _SESSION_OPTIONS},
    )

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _listen(_dbapi: Any, record: Any) -> None:
        record.driver_connection.add_notice_handler(explained.notice)

    store = SqlSagaStore(
        engine,
        table_prefix=unique_prefix(),
        create_tables=True,
        owns_engine=True,
        hot_connections=1,
    )
    try:
        await store.initialize()
        yield store, explained
    finally:
        try:
            await store.drop_tables()
        finally:
            await store.close()


async def fill_outbox(store: SqlSagaStore) -> None:
    """50,000 unsent records of 5,000 sagas in one statement; 500 sagas' heads held elsewhere."""
    outbox = store.tables.outbox.name
    statement = f"""
        INSERT INTO "{outbox}" (saga_id, route, key, message_id, message_type, headers, body,
                                timestamp, created_at, attempts, claimed_by, claimed_until)
        SELECT 'saga-' || lpad((g % {SAGAS})::text, 5, '0'), 'command', 'inventory',
               'm-' || g, 'Reserve', '{{}}'::jsonb, '\\x00'::bytea, :at, :at, 0,
               CASE WHEN g <= {BLOCKED} THEN 'relay-other' END,
               CASE WHEN g <= {BLOCKED} THEN CAST(:until AS timestamptz) END
        FROM generate_series(1, {BACKLOG}) AS g
    """
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(statement), {"at": T0, "until": T0 + timedelta(hours=1)})


async def test_a_claim_from_a_50k_backlog_touches_buffers_bounded_by_its_batch(
    planned_store: tuple[SqlSagaStore, Explained],
) -> None:
    store, explained = planned_store
    for _ in range(3):  # the claim, planned on the empty outbox by the connection it runs on
        assert await store.claim(owner="relay-a", limit=BATCH, lease=LEASE, now=T0) == []
    await fill_outbox(store)
    explained.take()

    leased: dict[str, list[int]] = {}
    for batch in range(5):  # five relays, one after the other
        records = await store.claim(owner=f"relay-{batch}", limit=BATCH, lease=LEASE, now=T0)
        plans = explained.take()
        assert len(records) == BATCH, batch
        ids = [record.id for record in records]
        assert ids == sorted(ids)
        for record in records:
            leased.setdefault(record.saga_id, []).append(record.id)
        touched = sum(buffers(plan) for plan in plans)
        assert plans, "the claim's statements were explained"
        assert touched <= BUFFERS_PER_RECORD * BATCH, (batch, touched)

    # Oldest first, passing by the sagas another relay holds; one head per saga (the later
    # records of a saga wait until its head is sent), each saga at most once.
    firsts = sorted(ids[0] for ids in leased.values())
    assert all(len(ids) == 1 for ids in leased.values())
    assert firsts == list(range(BLOCKED + 1, BLOCKED + 1 + 5 * BATCH))


async def test_slow_claims_and_saves_are_logged_and_recorded(
    planned_store: tuple[SqlSagaStore, Explained], caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = planned_store
    store._slow_seconds = 0.0  # every claim and save is slow
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    store.watch_slow_statements(telemetry.record_slow_statement)
    saga = make_instance("saga-1")
    with caplog.at_level(logging.WARNING, logger="sagas.sqlalchemy"):
        await store.save([insert(saga, outbox=[make_envelope("m-1", saga.saga_id)])])
        await store.claim(owner="relay-a", limit=7, lease=LEASE, now=T0)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [getattr(record, "statement", None) for record in warnings] == ["save", "claim"]
    assert [getattr(record, "batch_size", None) for record in warnings] == [1, 7]
    assert "slow claim" in warnings[1].getMessage()
    assert "batch of 7" in warnings[1].getMessage()
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "saga.store.slow_statement.duration"
        for point in metric.data.data_points
    ]
    recorded = {
        str((point.attributes or {})["db.operation.name"]): point.count
        for point in points
        if isinstance(point, HistogramDataPoint)
    }
    assert recorded == {"save": 1, "claim": 1}


# ---------------------------------------------------------------------- every hot statement

_PARAM = re.compile(r"%\((\w+)\)s|%s")


def hot_statement_params(store: SqlSagaStore) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each hot statement of the psycopg lane with the values a worker would run it with."""
    pg = store._pg
    assert pg is not None
    new = make_instance("saga-new")
    old = make_instance("saga-00042")
    step = update(old, inbox=InboxEntry("orchestrator", "r-1"))
    inserting = pg.save_params(
        insert(new, outbox=[make_envelope("m-new", new.saga_id)]), owner="relay-a", until=T0
    )
    updating = pg.save_params(step, owner="relay-a", until=T0)
    sent = {"sent": [1, 2, 3]}
    return {
        "save (insert)": (inserting[0], inserting[1] | sent),
        "save (update)": (updating[0], updating[1] | sent),
        "mark sent": (pg.mark_sent, sent),
        "load": (pg.load, {"0": "saga-00042"}),
        "claim due": (pg.claim_due, {"owner": "a", "until": T0, "now": T0, "limit": BATCH}),
        "claim": (
            pg.claim,
            {"owner": "a", "until": T0, "now": T0, "after": 0, "window": 800, "limit": BATCH},
        ),
    }


def numbered(statement: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match[1] or str(len(names))
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(number, statement), [params[name] for name in names]


@pytest.mark.parametrize(
    "name", ["save (insert)", "save (update)", "mark sent", "load", "claim due", "claim"]
)
async def test_each_hot_statement_planned_on_empty_tables_stays_bounded_at_a_large_backlog(
    psycopg_store: SqlSagaStore, name: str
) -> None:
    store = psycopg_store
    statement, params = hot_statement_params(store)[name]
    prepared, values = numbered(statement, params)
    inst = store.tables.instances.name
    assert store._lane is not None
    async with store._lane.connection() as conn:
        await conn.execute(f"PREPARE probe AS {prepared}")  # generic: the lane forces it
        try:
            await fill_outbox(store)
            await conn.execute(
                f'INSERT INTO "{inst}" SELECT (jsonb_populate_record(NULL::"{inst}", '
                "%s::jsonb || jsonb_build_object('saga_id', 'saga-' || lpad(g::text, 5, '0'), "
                "'next_deadline_at', %s::timestamptz - g * interval '1 second'))).* "
                f"FROM generate_series(0, {SAGAS - 1}) AS g",
                (make_instance("x").model_dump_json(), T0),
            )
            client = psycopg.AsyncClientCursor(conn)
            arguments = ", ".join(["%s"] * len(values))
            await client.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE probe({arguments})", values
            )
            row = await client.fetchone()
        finally:
            await conn.execute("DEALLOCATE probe")
    assert row is not None
    touched = buffers(row[0][0])
    assert touched <= BUFFERS_PER_RECORD * BATCH, (name, touched, json.dumps(row[0], indent=1))
