"""The PostgreSQL hot path of the SQL store: prebuilt statements on raw psycopg 3 connections.

What the orchestrator and the relay do for every transition (save, load, mark sent, claim due
deadlines) runs here, not through SQLAlchemy Core: each operation is one SQL statement, built
once per store, executed in autocommit mode on a psycopg connection the store keeps (no
statement compilation, pool checkout, greenlet hop or ``BEGIN``/``COMMIT`` round trips per
call; psycopg prepares a statement on the server once it has run a few times).

A save is a single statement of data-modifying CTEs, so it is atomic on its own, in one round
trip: the saga row (``INSERT ... ON CONFLICT DO NOTHING``, or ``UPDATE ... WHERE version = :v``)
first, and the history, outbox and inbox rows only ``FROM`` its ``RETURNING``, so a version
conflict writes nothing at all. The inbox row is a plain insert: a duplicate message violates
its primary key, which aborts the whole statement (nothing written) and is reported as
:class:`~sagas_abstractions.DuplicateMessage`. A batch of changes is one transaction of such
statements. Values travel as JSON (pydantic dumps them; ``jsonb_populate_record`` maps them to
columns), message bodies as one text parameter (base64, comma-separated).

Connections are opened through the engine's pool (same URL, connect arguments and events) and
then detached from it, so the pool's own limits stay free for the other, rarer queries. They
are not pinged before use (a round trip each): an idle connection whose socket is readable has
heard from the server, and for an idle connection that means the backend went away (a
terminated backend sends its farewell and closes the socket), so it is dropped and replaced
before it is used. A connection that fails during a statement is dropped too.
"""

# Statements are built from table names only (the prefix is validated as an identifier and
# quoted); every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from base64 import b64encode
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg import pq
from pydantic import TypeAdapter, ValidationError

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    Envelope,
    HistoryEntry,
    OutboxRecord,
    RouteKind,
    SagaChange,
    SagaInstance,
    StoreError,
)
from sagas_sqlalchemy._errors import store_error
from sagas_sqlalchemy.engine import has_pending_input

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine

    from sagas_sqlalchemy.tables import SagaTables

__all__ = ["GroupCommit", "PgLane", "PgStatements", "is_psycopg"]

Connection = psycopg.AsyncConnection[Any]

_log = logging.getLogger("sagas.sqlalchemy")

_HISTORY = TypeAdapter(list[HistoryEntry])
_ENVELOPES = TypeAdapter(list[Envelope])
_NO_BODY = {"__all__": {"body"}}

# PostgreSQL SQLSTATEs that mean "another transaction got in the way; try again".
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
_UNIQUE_VIOLATION = "23505"


def is_psycopg(engine: AsyncEngine) -> bool:
    """Whether the engine talks to PostgreSQL through psycopg 3 (the hot path's driver)."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PgStatements:
    """The hot statements of one table prefix, built once."""

    def __init__(self, tables: SagaTables) -> None:
        self.tables = tables
        inst, hist, outbox, inbox = (
            _q(table.name)
            for table in (tables.instances, tables.history, tables.outbox, tables.inbox)
        )
        self.inbox_table = tables.inbox.name
        fields = list(SagaInstance.model_fields)
        missing = [name for name in fields if name not in tables.instances.c]
        if missing:  # pragma: no cover - a model field without a column is a schema bug
            raise RuntimeError(f"saga instance fields without a column: {missing}")
        model_columns = ", ".join(_q(name) for name in fields)
        # Every column but the key, from the instance's JSON: the claim columns are absent
        # from it, so they come out NULL (a new version releases the deadline claim).
        written = [name for name in fields if name != "saga_id"]
        full_set = [*written, "next_deadline_at", "deadline_claimed_by", "deadline_claimed_until"]
        full_values = [
            *(f"r.{_q(name)}" for name in written),
            "%(next)s::timestamptz",
            "r.deadline_claimed_by",
            "r.deadline_claimed_until",
        ]
        status_set = [
            "status",
            "error",
            "wait",
            "deadline_at",
            "next_deadline_at",
            "version",
            "updated_at",
            "deadline_claimed_by",
            "deadline_claimed_until",
        ]
        status_values = [
            "%(next)s::timestamptz" if name == "next_deadline_at" else f"r.{_q(name)}"
            for name in status_set
        ]
        doc = f"jsonb_populate_record(NULL::{inst}, %(doc)s::jsonb) AS r"
        where = "t.saga_id = %(id)s::text AND t.version = %(expected)s::integer"

        def update(columns: list[str], values: list[str]) -> str:
            return (
                f"UPDATE {inst} AS t SET ({', '.join(_q(c) for c in columns)}) = "
                f"(SELECT {', '.join(values)} FROM {doc}) WHERE {where} RETURNING t.saga_id"
            )

        self._row = {
            "insert": (
                f"INSERT INTO {inst} ({model_columns}, next_deadline_at) "
                f"SELECT {', '.join(f'r.{_q(name)}' for name in fields)}, "
                f"%(next)s::timestamptz FROM {doc} "
                "ON CONFLICT (saga_id) DO NOTHING RETURNING saga_id"
            ),
            "update": update(full_set, full_values),
            "status": update(status_set, status_values),
            # The saga row stays as it is, but the version check (and its row lock) holds.
            "touch": (
                f"UPDATE {inst} AS t SET version = t.version WHERE {where} RETURNING t.saga_id"
            ),
        }
        history_columns = ", ".join(
            _q(column.name) for column in tables.history.c if column.name != "id"
        )
        history_values = ", ".join(
            f"r.{_q(column.name)}" for column in tables.history.c if column.name != "id"
        )
        # Records the relay published meanwhile go with the next save's statement (see
        # GroupCommit.mark_sent); with no ids this matches nothing. A published record is
        # deleted, not updated: an update writes a whole new row version and an entry in each
        # index, a delete neither (bench/store_cost.py; figures in docs/performance.md,
        # "Figures behind the code").
        # Rows another transaction has locked (a relay's claim re-leasing records it holds)
        # are skipped, not waited for: waiting could close a lock cycle with that claim (a
        # deadlock, found only after deadlock_timeout). What was skipped is reported as
        # ``kept`` and deleted by a later statement.
        # Both find the records by their key, one lookup per id, whatever the statistics: the
        # two other outbox indexes end with ``id`` too, and for ``id = ANY(...)`` a plan made
        # while the outbox looked small (a fresh table, a new connection's first plans) scans
        # one of them whole. The plan is kept, and such a scan grows with the dead entries
        # every deleted record leaves in the index until a vacuum: the statement's cost grew
        # by the minute (docs/performance.md, "Figures behind the code"). A
        # lateral lookup of one id is cheapest through the key's index, where ``id`` leads;
        # the delete then takes the rows it locked by ``ctid``.
        mark = (
            f"DELETE FROM {outbox} WHERE ctid = ANY(ARRAY("
            "SELECT l.ctid FROM unnest(%(sent)s::bigint[]) AS u(id) CROSS JOIN LATERAL "
            f"(SELECT ctid FROM {outbox} WHERE id = u.id FOR UPDATE SKIP LOCKED) AS l"
            ")) RETURNING id"
        )
        kept = (
            "(SELECT array_agg(u.id) FROM unnest(%(sent)s::bigint[]) AS u(id) CROSS JOIN LATERAL "
            f"(SELECT p.id FROM {outbox} AS p WHERE p.id = u.id LIMIT 1) AS p "
            "WHERE u.id NOT IN (SELECT id FROM m))"
        )
        # Whether every earlier unsent record of the saga is the owner's (``k``) is looked up
        # through the saga's index only: ``(sent_at IS NULL) IS TRUE`` means ``sent_at IS
        # NULL`` but is no index condition, so the pending index, where that would be the
        # leading column, is no candidate. Without statistics (a fresh table) the planner
        # rated both alike and could take the pending index and read every unsent record's
        # entry, and every dead one, for each save.
        tail = f"""
, h AS (
    INSERT INTO {hist} ({history_columns})
    SELECT {history_values} FROM jsonb_populate_recordset(NULL::{hist}, %(history)s::jsonb) AS r
    WHERE EXISTS (SELECT FROM s)
), k AS (
    SELECT %(owner)s::text IS NOT NULL AND NOT EXISTS (
        SELECT FROM {outbox} AS p
        WHERE p.saga_id = %(id)s::text AND (p.sent_at IS NULL) IS TRUE
          AND p.claimed_by IS DISTINCT FROM %(owner)s::text
    ) AS ok
), o AS (
    INSERT INTO {outbox} (saga_id, route, key, message_id, message_type, correlation_id,
                          reply_to, headers, body, timestamp, created_at, attempts,
                          claimed_by, claimed_until)
    SELECT %(id)s::text, x.e->>'route', x.e->>'key', x.e->>'message_id', x.e->>'message_type',
           x.e->>'correlation_id', x.e->>'reply_to', x.e->'headers',
           decode(split_part(%(bodies)s::text, ',', x.n::integer), 'base64'),
           (x.e->>'timestamp')::timestamptz,
           %(at)s::timestamptz, 0,
           CASE WHEN k.ok THEN %(owner)s::text END,
           CASE WHEN k.ok THEN %(until)s::timestamptz END
    FROM jsonb_array_elements(%(outbox)s::jsonb) WITH ORDINALITY AS x(e, n) CROSS JOIN k
    WHERE EXISTS (SELECT FROM s)
    ORDER BY x.n
    RETURNING id, claimed_by
), i AS (
    INSERT INTO {inbox} (consumer, message_id, processed_at)
    SELECT %(consumer)s::text, %(message)s::text, %(at)s::timestamptz
    FROM s WHERE %(consumer)s::text IS NOT NULL
), m AS (
    {mark}
)
SELECT (SELECT count(*) FROM s),
       (SELECT version FROM {inst} WHERE saga_id = %(id)s::text),
       (SELECT array_agg(id ORDER BY id) FROM o),
       (SELECT count(*) FROM o WHERE claimed_by IS NOT NULL),
       {kept}
"""
        self.save = {kind: f"WITH s AS ({row}){tail}" for kind, row in self._row.items()}
        self.save_many = _save_many(
            inst=inst,
            hist=hist,
            outbox=outbox,
            inbox=inbox,
            fields=fields,
            full_set=full_set,
            status_set=status_set,
            history_columns=history_columns,
            history_values=history_values,
            mark=mark,
            kept=kept,
        )
        self.load = (
            f"SELECT to_json(r)::text FROM (SELECT {model_columns} FROM {inst} "
            "WHERE saga_id = %s::text) AS r"
        )
        self.mark_sent = f"WITH m AS ({mark}) SELECT {kept}"
        self.claim = _claim(outbox)
        self.claim_due = f"""
UPDATE {inst} AS t SET deadline_claimed_by = %(owner)s::text,
                       deadline_claimed_until = %(until)s::timestamptz
WHERE t.saga_id IN (
    SELECT c.saga_id FROM {inst} AS c
    WHERE c.next_deadline_at <= %(now)s::timestamptz
      AND (c.deadline_claimed_until IS NULL OR c.deadline_claimed_until <= %(now)s::timestamptz
           OR c.deadline_claimed_by = %(owner)s::text)
    ORDER BY c.next_deadline_at, c.saga_id
    LIMIT %(limit)s::integer
    FOR UPDATE SKIP LOCKED
)
RETURNING to_json(t)::text
"""

    def save_params(
        self,
        change: SagaChange,
        *,
        owner: str | None,
        until: datetime | None,
        marks: _MarkBatch | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The statement and parameters writing one change (and marking ``marks`` sent)."""
        instance = change.instance
        kind = _kind(change)
        inbox = change.inbox
        return self.save[kind], {
            "id": instance.saga_id,
            "expected": change.expected_version,
            "doc": instance.model_dump_json(),
            "next": instance.next_deadline_at,
            "history": _HISTORY.dump_json(list(change.history)).decode(),
            "outbox": _ENVELOPES.dump_json(list(change.outbox), exclude=_NO_BODY).decode(),
            # One text parameter: psycopg adapts a list (a bytea[]) far more slowly.
            "bodies": ",".join(b64encode(envelope.body).decode() for envelope in change.outbox),
            "at": instance.updated_at,
            "owner": owner,
            "until": until,
            "consumer": None if inbox is None else inbox.consumer,
            "message": None if inbox is None else inbox.message_id,
            "sent": [] if marks is None else marks.ids,
        }


OUTBOX_COLUMNS = (
    "id",
    "saga_id",
    "route",
    "key",
    "message_id",
    "message_type",
    "correlation_id",
    "reply_to",
    "headers",
    "body",
    "timestamp",
    "created_at",
    "attempts",
)
"""The outbox columns :attr:`PgStatements.claim` returns per record, in order."""


def _claim(outbox: str) -> str:
    """One claim of a window of the outbox: at most ``window`` unsent records after ``after``.

    Why a window: the claim used to ask, for every unsent record in id order, whether an
    earlier unsent record of its saga exists, until it had ``limit`` heads. Planned once while
    the outbox was empty (a generic plan is kept), that became an anti-join scanning the whole
    pending index for each record: quadratic in the backlog (a batch of 100 took 26 s at 25k
    records). Here every step is bounded by the window, whatever the plan: the window is the
    first ``window`` unsent records in id order (an ordered index walk that stops at the
    limit), each saga's first record in it is checked against its saga's index (one ordered
    probe, ``LIMIT 1``), at most ``limit`` heads are locked, and the records to lease are the
    window's records of those sagas. The caller moves the window on when it held too few.

    Each saga's records in the window are a prefix of its unsent records (the window is a
    contiguous run of them in id order), so "lease up to the first record that may not go"
    is a running AND over the window's records of the saga. ``(e.sent_at IS NULL) IS TRUE``
    keeps the pending index, where ``sent_at`` leads, out of the probe (see the saves), and
    ordering the probe by the saga index's own columns leaves no other index a plan without
    a sort. The rows to lease are locked one by one by key (no join the planner could turn
    into a scan) and updated by ``ctid``, which the lock made current.
    """
    free = (
        "(o.claimed_until IS NULL OR o.claimed_until <= %(now)s::timestamptz"
        " OR o.claimed_by = %(owner)s::text)"
        " AND (o.available_at IS NULL OR o.available_at <= %(now)s::timestamptz)"
    )
    returned = ", ".join(f"u.{_q(name)}" for name in OUTBOX_COLUMNS)
    return f"""
WITH w AS MATERIALIZED (
    SELECT o.id, o.saga_id, {free} AS free
    FROM {outbox} AS o
    WHERE o.sent_at IS NULL AND o.id > %(after)s::bigint
    ORDER BY o.sent_at, o.id
    LIMIT %(window)s::integer
), r AS MATERIALIZED (
    SELECT w.id, w.saga_id, w.free, bool_and(w.free) OVER s AS run, row_number() OVER s = 1 AS first
    FROM w WINDOW s AS (PARTITION BY w.saga_id ORDER BY w.id)
), h AS MATERIALIZED (
    SELECT l.saga_id
    FROM (SELECT r.id FROM r WHERE r.first AND r.free ORDER BY r.id) AS c
    CROSS JOIN LATERAL (
        SELECT o.saga_id FROM {outbox} AS o
        WHERE o.id = c.id AND o.sent_at IS NULL AND {free}
          AND o.id = (
              SELECT e.id FROM {outbox} AS e
              WHERE e.saga_id = o.saga_id AND (e.sent_at IS NULL) IS TRUE
              ORDER BY e.saga_id, e.sent_at, e.id
              LIMIT 1
          )
        FOR UPDATE SKIP LOCKED
    ) AS l
    LIMIT %(limit)s::integer
), chosen AS (
    SELECT r.id FROM r
    WHERE r.run AND r.saga_id IN (SELECT h.saga_id FROM h)
    ORDER BY r.id
    LIMIT %(limit)s::integer
), u AS (
    UPDATE {outbox} AS t
    SET claimed_by = %(owner)s::text, claimed_until = %(until)s::timestamptz
    WHERE t.ctid = ANY(ARRAY(
        SELECT l.ctid FROM chosen AS c CROSS JOIN LATERAL
        (SELECT o.ctid FROM {outbox} AS o WHERE o.id = c.id FOR UPDATE) AS l
    ))
    RETURNING t.*
), n AS (
    SELECT count(*) AS walked, max(w.id) AS last FROM w
)
SELECT n.walked, n.last, {returned}
FROM n LEFT JOIN u ON true
ORDER BY u.id
"""


def _save_many(
    *,
    inst: str,
    hist: str,
    outbox: str,
    inbox: str,
    fields: list[str],
    full_set: list[str],
    status_set: list[str],
    history_columns: str,
    history_values: str,
    mark: str,
    kept: str,
) -> str:
    """One statement writing the changes of several sagas (one change per saga), set-based.

    Each change is written or not on its own (a stale version skips that saga only); a
    duplicate inbox row fails the whole statement (the caller then writes them one by one).
    """

    def value(name: str) -> str:
        return "c.next" if name == "next_deadline_at" else f"r.{_q(name)}"

    def update(kind: str, columns: list[str]) -> str:
        return (
            f"UPDATE {inst} AS t SET ({', '.join(_q(c) for c in columns)}) = "
            f"(SELECT {', '.join(value(c) for c in columns)} "
            f"FROM jsonb_populate_record(NULL::{inst}, c.doc) AS r) "
            f"FROM c WHERE c.kind = '{kind}' AND t.saga_id = c.saga_id "
            "AND t.version = c.expected RETURNING t.saga_id"
        )

    return f"""
WITH c AS (
    SELECT * FROM jsonb_to_recordset(%(changes)s::jsonb) AS c(
        i integer, kind text, saga_id text, expected integer, doc jsonb, next timestamptz,
        history jsonb, outbox jsonb, bodies text, at timestamptz, owner text,
        until timestamptz, consumer text, message text)
), ins AS (
    INSERT INTO {inst} ({", ".join(_q(name) for name in fields)}, next_deadline_at)
    SELECT {", ".join(f"r.{_q(name)}" for name in fields)}, c.next
    FROM c CROSS JOIN LATERAL jsonb_populate_record(NULL::{inst}, c.doc) AS r
    WHERE c.kind = 'insert'
    ON CONFLICT (saga_id) DO NOTHING RETURNING saga_id
), upd AS ({update("update", full_set)}
), sts AS ({update("status", status_set)}
), tch AS (
    UPDATE {inst} AS t SET version = t.version FROM c
    WHERE c.kind = 'touch' AND t.saga_id = c.saga_id AND t.version = c.expected
    RETURNING t.saga_id
), s AS (
    SELECT saga_id FROM ins UNION ALL SELECT saga_id FROM upd
    UNION ALL SELECT saga_id FROM sts UNION ALL SELECT saga_id FROM tch
), w AS (
    SELECT c.* FROM c WHERE c.saga_id IN (SELECT saga_id FROM s)
), h AS (
    INSERT INTO {hist} ({history_columns})
    SELECT {history_values}
    FROM w CROSS JOIN LATERAL jsonb_populate_recordset(NULL::{hist}, w.history) AS r
), k AS (
    SELECT w.saga_id, w.owner IS NOT NULL AND NOT EXISTS (
        SELECT FROM {outbox} AS p
        WHERE p.saga_id = w.saga_id AND (p.sent_at IS NULL) IS TRUE
          AND p.claimed_by IS DISTINCT FROM w.owner
    ) AS ok
    FROM w
), o AS (
    INSERT INTO {outbox} (saga_id, route, key, message_id, message_type, correlation_id,
                          reply_to, headers, body, timestamp, created_at, attempts,
                          claimed_by, claimed_until)
    SELECT w.saga_id, x.e->>'route', x.e->>'key', x.e->>'message_id', x.e->>'message_type',
           x.e->>'correlation_id', x.e->>'reply_to', x.e->'headers',
           decode(split_part(w.bodies, ',', x.n::integer), 'base64'),
           (x.e->>'timestamp')::timestamptz, w.at, 0,
           CASE WHEN k.ok THEN w.owner END, CASE WHEN k.ok THEN w.until END
    FROM w JOIN k ON k.saga_id = w.saga_id
    CROSS JOIN LATERAL jsonb_array_elements(w.outbox) WITH ORDINALITY AS x(e, n)
    ORDER BY w.i, x.n
    RETURNING id, saga_id, claimed_by
), n AS (
    INSERT INTO {inbox} (consumer, message_id, processed_at)
    SELECT w.consumer, w.message, w.at FROM w WHERE w.consumer IS NOT NULL
), m AS (
    {mark}
)
SELECT c.i, c.saga_id IN (SELECT saga_id FROM s),
       (SELECT version FROM {inst} AS v WHERE v.saga_id = c.saga_id),
       (SELECT array_agg(o.id ORDER BY o.id) FROM o WHERE o.saga_id = c.saga_id),
       (SELECT count(*) FROM o WHERE o.saga_id = c.saga_id AND o.claimed_by IS NOT NULL),
       {kept}
FROM c ORDER BY c.i
"""


def _kind(change: SagaChange) -> str:
    """Which saga-row statement writes the change (and refuse what cannot be stored)."""
    instance = change.instance
    if change.status_only:
        if change.expected_version is None:
            raise ValueError("a status_only change updates a saga: set expected_version")
        kind = "status"
    elif change.expected_version is None:
        kind = "insert"
    elif instance.version > change.expected_version:
        kind = "update"
    else:
        kind = "touch"
    _refuse_naive(
        instance.created_at,
        instance.updated_at,
        instance.deadline_at,
        instance.saga_deadline_at,
        *(entry.at for entry in change.history),
        *(envelope.timestamp for envelope in change.outbox),
    )
    return kind


def _moment(value: datetime | None) -> str:
    return "null" if value is None else f'"{value.isoformat()}"'


def change_document(
    index: int, change: SagaChange, *, owner: str | None, until: datetime | None
) -> str:
    """One change as a JSON object of the batch statement (pre-dumped parts spliced in)."""
    instance = change.instance
    kind = _kind(change)
    inbox = change.inbox
    expected = change.expected_version
    return (
        f'{{"i":{index},"kind":"{kind}","saga_id":{json.dumps(instance.saga_id)},'
        f'"expected":{"null" if expected is None else expected},'
        f'"doc":{instance.model_dump_json()},"next":{_moment(instance.next_deadline_at)},'
        f'"history":{_HISTORY.dump_json(list(change.history)).decode()},'
        f'"outbox":{_ENVELOPES.dump_json(list(change.outbox), exclude=_NO_BODY).decode()},'
        f'"bodies":"{",".join(b64encode(envelope.body).decode() for envelope in change.outbox)}",'
        f'"at":{_moment(instance.updated_at)},"owner":{json.dumps(owner)},'
        f'"until":{_moment(until)},'
        f'"consumer":{json.dumps(None if inbox is None else inbox.consumer)},'
        f'"message":{json.dumps(None if inbox is None else inbox.message_id)}}}'
    )


def _refuse_naive(*moments: datetime | None) -> None:
    for moment in moments:
        if moment is not None and moment.tzinfo is None:
            raise StoreError(f"naive datetime {moment!r}: sagas stores timezone-aware UTC only")


class PgLane:
    """The store's own psycopg connections for the hot statements.

    Args:
        engine: Opens the connections (through its pool, then detached from it).
        size: At most this many connections, and so statements, at once.
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max(1, size))
        self._open: set[Connection] = set()

    def connection(self) -> _Use:
        """A live connection in autocommit mode, idle (no transaction open), for one use.

        Use it as ``async with lane.connection() as conn``. A connection that failed with a
        connection error, or comes back inside a transaction, is closed, not reused.
        """
        return _Use(self)

    async def _checkout(self) -> Connection:
        await self._slots.acquire()
        try:
            return await self._take()
        except BaseException:
            self._slots.release()
            raise

    async def _checkin(self, conn: Connection, error: BaseException | None) -> None:
        try:
            if isinstance(error, _LINK_ERRORS) or not _idle(conn):
                await self._drop(conn)  # the link is gone or in doubt: never reuse it
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def _take(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if _idle(conn) and not _heard_from_server(conn):
                return conn
            await self._drop(conn)
        return await self._connect()

    async def _connect(self) -> Connection:
        fairy = await self._engine.raw_connection()
        conn = cast("Connection", fairy.driver_connection)
        fairy.detach()  # ours now: the pool neither counts nor closes it
        self._open.add(conn)
        try:
            await conn.rollback()  # the pool may hand it over inside a transaction
            await conn.set_autocommit(True)
            # JSON renders timestamps in the session time zone; sagas reads them back in UTC.
            await conn.execute("SET TIME ZONE 'UTC'")
            # Every hot statement finds its rows through an index (a key, a saga's outbox
            # records, due deadlines). Left to its estimates, the planner scans the outbox
            # whole: it holds few live rows (published ones are deleted) and a fresh table has
            # no statistics, so a sequential scan looks cheapest, and the generic plan keeps
            # it. But between vacuums the outbox is mostly dead rows, and every save checked
            # each of them, three times (docs/performance.md, "Figures behind the code").
            await conn.execute("SET enable_seqscan = off")
            # One plan per statement and connection, made once. Left to choose, PostgreSQL
            # plans a prepared statement anew at every execution while those custom plans
            # look cheaper than the generic one, and for the saves that depends on the
            # tables' statistics when a connection first ran them: a second worker planned
            # nearly every bind anew, and the planning time per step doubled with two workers
            # (docs/performance.md, "Figures behind the code").
            # The statements find every row through a key or the saga's index whatever the
            # values (see PgStatements), so the generic plan is as good as a custom one.
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        except BaseException:
            await self._drop(conn)
            raise
        return conn

    async def _drop(self, conn: Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        """Close every connection (those in use are closed as they come back)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)
        for conn in list(self._open):
            if conn not in idle:
                self._open.discard(conn)
                with contextlib.suppress(Exception):
                    await conn.close()


class _Use:
    """One use of a lane connection (a plain class: cheaper than a generator-based one)."""

    __slots__ = ("_conn", "_lane")

    def __init__(self, lane: PgLane) -> None:
        self._lane = lane
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        self._conn = await self._lane._checkout()  # noqa: SLF001 - the lane's own helper
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._lane._checkin(self._conn, exc)  # noqa: SLF001 - the lane's own helper


_LINK_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, OSError)


def _idle(conn: Connection) -> bool:
    if conn.closed or conn.broken:
        return False
    return conn.pgconn.transaction_status == pq.TransactionStatus.IDLE


def _heard_from_server(conn: Connection) -> bool:
    """Whether an idle connection's socket has something to read (no round trip)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return True
    return has_pending_input(fd)


async def execute_change(
    conn: Connection,
    statements: PgStatements,
    change: SagaChange,
    *,
    owner: str | None,
    until: datetime | None,
    marks: _MarkBatch | None = None,
) -> list[OutboxRecord]:
    """Write one change (and mark ``marks`` sent); returns the records it leased to ``owner``.

    Raises:
        ConcurrencyConflict: The saga moved on (or, for an insert, exists); nothing written.
        DuplicateMessage: The inbox has the message already; nothing written.
        psycopg.Error: Anything else (the caller translates it).
    """
    instance = change.instance
    try:
        query, params = statements.save_params(change, owner=owner, until=until, marks=marks)
        cursor = await conn.execute(query, params)
        row = await cursor.fetchone()
    except BaseException as error:
        if marks is not None:
            marks.failed()  # nothing of the statement was written: mark them another time
        if not isinstance(error, psycopg.errors.UniqueViolation):
            raise
        if change.inbox is not None and error.diag.table_name == statements.inbox_table:
            raise DuplicateMessage(
                consumer=change.inbox.consumer,
                message_id=change.inbox.message_id,
                saga_id=instance.saga_id,
            ) from error
        raise
    assert row is not None  # noqa: S101 - the statement always returns one row
    written, stored, ids, leased, kept = row
    if marks is not None:
        marks.done(kept)
    if not written:
        raise ConcurrencyConflict(
            saga_id=instance.saga_id,
            expected_version=change.expected_version,
            actual_version=stored,
            saga_type=instance.saga_type,
        )
    return _records(change, ids, leased)


def outbox_record(row: Sequence[Any]) -> OutboxRecord:
    """The record from a row of :attr:`PgStatements.claim` (its :data:`OUTBOX_COLUMNS`)."""
    (
        row_id,
        saga_id,
        route,
        key,
        message_id,
        message_type,
        correlation_id,
        reply_to,
        headers,
        body,
        timestamp,
        created_at,
        attempts,
    ) = row
    return OutboxRecord(
        id=row_id,
        saga_id=saga_id,
        envelope=Envelope(
            route=RouteKind(route),
            key=key,
            message_id=message_id,
            message_type=message_type,
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers=headers,
            body=bytes(body),
            timestamp=timestamp,
        ),
        created_at=created_at,
        attempts=attempts,
    )


def _records(change: SagaChange, ids: list[int] | None, leased: int | None) -> list[OutboxRecord]:
    instance = change.instance
    if not ids or not leased:
        return []
    return [
        OutboxRecord.model_construct(
            id=row_id,
            saga_id=instance.saga_id,
            envelope=envelope,
            created_at=instance.updated_at,
            attempts=0,
        )
        for row_id, envelope in zip(ids, change.outbox, strict=True)
    ]


class _MarkBatch:
    """Outbox ids to mark sent, carried by one statement; its waiters learn how it went."""

    __slots__ = ("ids", "owner", "waiters")

    def __init__(
        self, owner: GroupCommit, ids: list[int], waiters: list[asyncio.Future[None]]
    ) -> None:
        self.owner = owner
        self.ids = ids
        self.waiters = waiters

    def done(self, kept: list[int] | None) -> None:
        """The statement carrying the ids went through: marked, but for ``kept`` (locked)."""
        if kept:
            self.ids = kept
            self.owner._requeue_marks(self)  # noqa: SLF001 - the batch belongs to its group
            return
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def failed(self) -> None:
        """The statement carrying the ids failed (nothing written): mark them another time."""
        self.owner._requeue_marks(self)  # noqa: SLF001 - the batch belongs to its group


@dataclass(slots=True)
class _Pending:
    change: SagaChange
    owner: str | None
    until: datetime | None
    future: asyncio.Future[list[OutboxRecord]]


class GroupCommit:
    """Single-change saves of different sagas that queue up share one statement and commit.

    A save that finds the stream free is written at once, alone (no added latency when the
    store is not busy). Saves that arrive while every stream is writing wait, and the next
    stream to finish writes all of them (one change per saga; up to ``max_batch``) in one
    statement: one round trip, one commit, one WAL flush for many transitions. Each change
    still succeeds or fails on its own: a stale version skips that saga only. A duplicate
    inbox row (or any other error) fails the shared statement; its changes are then written
    one by one, so each caller gets its own outcome.

    Marking outbox records sent (deleting them) rides along the same way: :meth:`mark_sent`
    waits for the next save's statement to carry the ids (no statement, round trip or commit of
    its own while sagas are moving), or deletes them alone after ``mark_delay`` seconds without
    a save.

    One stream by default: while its statement runs, the next batch gathers, and a batch costs
    the database far less per change than a statement of its own. Two streams wrote smaller
    batches side by side, which cost more than they overlapped (docs/performance.md, "Figures
    behind the code"). One statement of up to ``max_batch`` changes every round trip is more
    than a worker process can feed.

    Args:
        lane: Where the statements run.
        statements: The store's statements.
        streams: Statements written at once through the group commit.
        max_batch: At most this many changes per statement.
        mark_delay: At most this many seconds a mark waits for a save to carry it.
    """

    def __init__(
        self,
        lane: PgLane,
        statements: PgStatements,
        *,
        streams: int = 1,
        max_batch: int = 64,
        mark_delay: float = 0.02,
    ) -> None:
        self._lane = lane
        self._statements = statements
        self._streams = max(1, streams)
        self._max_batch = max(1, max_batch)
        self._mark_delay = mark_delay
        self._queue: list[_Pending] = []
        self._running = 0
        self._drains: set[asyncio.Task[None]] = set()
        self._marks: list[int] = []
        self._mark_waiters: list[asyncio.Future[None]] = []
        self._mark_timer: asyncio.TimerHandle | None = None
        self.batches = 0
        """Statements that wrote more than one change (for tests and benchmarks)."""
        self.marks_carried = 0
        """Mark-sent requests written by a save's statement (for tests and benchmarks)."""
        self.marks_alone = 0
        """Mark-sent statements of their own, after ``mark_delay`` without a save."""

    async def mark_sent(self, ids: list[int]) -> None:
        """Delete published outbox records, with the next save's statement or alone; waits.

        Raises:
            psycopg.Error: The statement of their own failed (the caller translates it).
        """
        if not ids:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._marks.extend(ids)
        self._mark_waiters.append(waiter)
        self._arm_marks()
        await waiter

    def _arm_marks(self) -> None:
        """Write the waiting marks alone ``mark_delay`` from now, unless a save carries them."""
        if self._mark_timer is None:
            loop = asyncio.get_running_loop()
            self._mark_timer = loop.call_later(self._mark_delay, self._marks_due)

    def _take_marks(self) -> _MarkBatch | None:
        if not self._marks:
            return None
        batch = _MarkBatch(self, self._marks, self._mark_waiters)
        self._marks, self._mark_waiters = [], []
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        return batch

    def _requeue_marks(self, batch: _MarkBatch) -> None:
        self._marks[:0] = batch.ids
        self._mark_waiters[:0] = batch.waiters
        self._arm_marks()

    def _marks_due(self) -> None:
        self._mark_timer = None
        task = asyncio.get_running_loop().create_task(self._mark_alone())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _mark_alone(self) -> None:
        batch = self._take_marks()
        if batch is None:
            return  # a save carried them meanwhile
        self.marks_alone += 1
        try:
            async with self._lane.connection() as conn:
                cursor = await conn.execute(self._statements.mark_sent, {"sent": batch.ids})
                row = await cursor.fetchone()
        except BaseException as error:
            # Told to the waiters (the relay keeps the ids and tries again); not requeued here.
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        batch.done(row[0] if row else None)

    async def save(
        self, change: SagaChange, *, owner: str | None, until: datetime | None
    ) -> list[OutboxRecord]:
        """Write one change (alone or with others); returns the records it leased to ``owner``.

        Raises:
            ConcurrencyConflict: As :func:`execute_change`.
            DuplicateMessage: As :func:`execute_change`.
            psycopg.Error: Anything else (the caller translates it).
        """
        if self._running < self._streams and not self._queue:
            self._running += 1
            try:
                async with self._lane.connection() as conn:
                    return await execute_change(
                        conn,
                        self._statements,
                        change,
                        owner=owner,
                        until=until,
                        marks=self._carry(),
                    )
            finally:
                self._release()
        future: asyncio.Future[list[OutboxRecord]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(change, owner, until, future))
        return await future

    async def close(self) -> None:
        """Let the saves being written finish (their callers get their outcomes), then marks."""
        for drain in list(self._drains):
            with contextlib.suppress(Exception):
                await drain
        if self._marks:
            with contextlib.suppress(Exception):
                await self._mark_alone()

    def _carry(self) -> _MarkBatch | None:
        """The waiting marks, for the statement about to run."""
        batch = self._take_marks()
        if batch is not None:
            self.marks_carried += len(batch.waiters)
        return batch

    def _release(self) -> None:
        if not self._queue:
            self._running -= 1
            return
        # Keep the stream and write what queued up meanwhile, without holding up this caller.
        drain = asyncio.get_running_loop().create_task(self._drain())
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch = self._take()
                await self._write(batch)
        except BaseException as error:
            # Cancelled (the loop is closing) or broken: no caller may wait forever.
            failed, self._queue = [*batch, *self._queue], []
            for pending in failed:
                _settle(pending.future, store_error("the save was not written", error))
            raise
        finally:
            self._running -= 1

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        later: list[_Pending] = []
        sagas: set[str] = set()
        for pending in self._queue:
            if pending.future.done():
                continue  # its caller gave up (cancelled) before it was written
            saga_id = pending.change.instance.saga_id
            if saga_id in sagas or len(batch) >= self._max_batch:
                later.append(pending)  # one change per saga and statement, in order
            else:
                sagas.add(saga_id)
                batch.append(pending)
        self._queue = later
        return batch

    async def _write(self, batch: list[_Pending]) -> None:
        if len(batch) > 1:
            try:
                results = await self._write_together(batch)
            except Exception as error:  # noqa: BLE001 - written one by one below, each on its own
                _log.debug("a shared save of %d changes failed (%s): one by one", len(batch), error)
            else:
                self.batches += 1
                for pending, result in zip(batch, results, strict=True):
                    _settle(pending.future, result)
                return
        for pending in batch:
            try:
                async with self._lane.connection() as conn:
                    records = await execute_change(
                        conn,
                        self._statements,
                        pending.change,
                        owner=pending.owner,
                        until=pending.until,
                        marks=self._carry(),
                    )
            except Exception as error:  # noqa: BLE001 - handed to the caller that waits for it
                _settle(pending.future, error)
            else:
                _settle(pending.future, records)

    async def _write_together(
        self, batch: list[_Pending]
    ) -> list[list[OutboxRecord] | BaseException]:
        document = (
            "["
            + ",".join(
                change_document(index, pending.change, owner=pending.owner, until=pending.until)
                for index, pending in enumerate(batch)
            )
            + "]"
        )
        marks = self._carry()
        try:
            async with self._lane.connection() as conn:
                cursor = await conn.execute(
                    self._statements.save_many,
                    {"changes": document, "sent": [] if marks is None else marks.ids},
                )
                rows = await cursor.fetchall()
        except BaseException:
            if marks is not None:
                marks.failed()
            raise
        if marks is not None:
            marks.done(rows[0][5] if rows else None)
        results: list[list[OutboxRecord] | BaseException] = []
        for (index, written, stored, ids, leased, _), pending in zip(rows, batch, strict=True):
            assert index == len(results)  # noqa: S101 - rows come back in the batch's order
            change = pending.change
            if not written:
                results.append(
                    ConcurrencyConflict(
                        saga_id=change.instance.saga_id,
                        expected_version=change.expected_version,
                        actual_version=stored,
                        saga_type=change.instance.saga_type,
                    )
                )
            else:
                results.append(_records(change, ids, leased))
        return results


def _settle(
    future: asyncio.Future[list[OutboxRecord]], result: list[OutboxRecord] | BaseException
) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def retryable(error: psycopg.Error) -> bool:
    """Whether the error is a deadlock or serialization failure (reload and reapply)."""
    return error.sqlstate in _RETRYABLE_SQLSTATES


def parse_instance(
    text: str, fallback: Callable[[Mapping[Any, Any]], SagaInstance]
) -> SagaInstance:
    """The saga from its row as JSON; ``fallback`` names the problem when it does not parse."""
    try:
        return SagaInstance.model_validate_json(text)
    except ValidationError:
        return fallback(json.loads(text))


def unique_violation(error: psycopg.Error) -> bool:
    """Whether the error is a unique-key violation."""
    return error.sqlstate == _UNIQUE_VIOLATION


def as_timestamp(value: str | None) -> datetime | None:
    """A timestamp from its JSON rendering (for sorting rows read as JSON)."""
    return None if value is None else datetime.fromisoformat(value)
