"""The hot statements' plans on PostgreSQL: made once per connection, through keys.

Each of the store's own connections plans a hot statement once (``plan_cache_mode =
force_generic_plan``) and keeps that plan, so it must be good whatever the tables' statistics
were when it was made. Outbox rows are found by their key or through the saga's index only:
the other outbox indexes also hold ``id`` (and ``sent_at``), and a plan scanning one of them
whole looks as cheap as a lookup while the outbox is small, but reads every entry, dead ones
included, for each save (bench: a save's statement went from ~55-105 buffers to 282 in the
plans of one process). These tests run on fresh tables, without statistics: the worst case.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from sagas_abstractions import InboxEntry
from sagas_sqlalchemy import SqlSagaStore
from tests.contracts.store_contract import T0, insert, make_envelope, make_instance, update

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE = timedelta(seconds=30)

# A scan of an index, and the index condition (if any) on the line after it.
_SCAN = re.compile(r"(?:Index Scan|Index Only Scan|Bitmap Index Scan) (?:using|on) (\S+)")


@pytest.fixture
def store(psycopg_store: SqlSagaStore) -> SqlSagaStore:
    return psycopg_store


async def generic_plan(store: SqlSagaStore, statement: str) -> str:
    """The plan a store connection keeps for ``statement`` (prepared, run with NULLs)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    # Every parameter is cast in the statement, so PREPARE infers the types; the values do
    # not matter to a generic plan.
    prepared = re.sub(r"%\((\w+)\)s", number, statement)
    assert store._lane is not None
    async with store._lane.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE probe AS {prepared}")
        cursor = await conn.execute(f"EXPLAIN EXECUTE probe({', '.join(['NULL'] * len(names))})")
        plan = "\n".join(str(row[0]) for row in await cursor.fetchall())
        await conn.execute("DEALLOCATE probe")
    return plan


def outbox_scans(plan: str, outbox: str) -> list[tuple[str, str]]:
    """(index, condition) of every index scan of the outbox in the plan."""
    lines = plan.splitlines()
    scans = []
    for at, line in enumerate(lines):
        found = _SCAN.search(line)
        if found and outbox in found[1]:
            condition = lines[at + 1].strip() if at + 1 < len(lines) else ""
            scans.append((found[1], condition if "Index Cond" in condition else ""))
    return scans


def hot_statements(store: SqlSagaStore) -> dict[str, str]:
    assert store._pg is not None
    return {
        **{f"save ({kind})": query for kind, query in store._pg.save.items()},
        "save of several sagas": store._pg.save_many,
        "mark sent": store._pg.mark_sent,
    }


async def test_the_kept_plans_find_outbox_rows_by_key_or_saga_only(store: SqlSagaStore) -> None:
    outbox = store._tables.outbox.name
    for n in range(20):  # a few live records and dead ones, as between two vacuums
        saga = make_instance(f"saga-{n}")
        records = await store.save_leased(
            [insert(saga, outbox=[make_envelope(f"m-{n}-{k}", saga.saga_id) for k in range(2)])],
            owner="relay-a",
            until=T0 + LEASE,
        )
        await store.mark_sent([records[0].id], now=T0)
    for name, statement in hot_statements(store).items():
        plan = await generic_plan(store, statement)
        scans = outbox_scans(plan, outbox)
        assert scans, f"{name}: the statement reads the outbox through an index"
        for index, condition in scans:
            # The key's index looked up by id; the saga's index by saga id (not by an id
            # further along its columns: that reads the whole index).
            leading = "(id = " if index == f"pk_{outbox}" else "(saga_id)::text = "
            assert index in {f"pk_{outbox}", f"ix_{outbox}_saga_id"}, f"{name}: {index}\n{plan}"
            assert condition.startswith("Index Cond: ("), f"{name}: {index}\n{plan}"
            assert leading in condition, f"{name}: {index} {condition}\n{plan}"


async def test_the_store_connections_plan_each_hot_statement_once(store: SqlSagaStore) -> None:
    # PostgreSQL's own choice re-planned the saves at every execution on some connections and
    # not on others (custom plans look cheaper than the generic one on a fresh table).
    for n in range(12):
        saga = make_instance(f"saga-{n}")
        records = await store.save_leased(
            [insert(saga, outbox=[make_envelope(f"m-{n}", saga.saga_id)])],
            owner="relay-a",
            until=T0 + LEASE,
        )
        await store.save_leased(
            [update(saga, inbox=InboxEntry("orchestrator", f"r-{n}"))],
            owner="relay-a",
            until=T0 + LEASE,
        )
        await store.mark_sent([record.id for record in records], now=T0)

    assert store._lane is not None
    async with store._lane.connection() as conn:
        cursor = await conn.execute(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        )
        prepared = await cursor.fetchall()
    saves = [row for row in prepared if str(row[0]).startswith("WITH s AS")]
    assert saves, "the saves run as prepared statements"
    assert all(custom == 0 for _, _, custom in saves), saves
    assert sum(generic for _, generic, _ in saves) > 0
