"""Throughput and latency of the real thing: a 3-step remote saga over RabbitMQ and PostgreSQL.

The orchestrator runs in this process (``SagaRuntime`` with the SQL store and the RabbitMQ bus);
the three participants run in one separate process (``python -m sagas_rabbitmq.host``).
Everything is durable: persistent messages with publisher confirms both ways, state, outbox,
inbox and history in PostgreSQL with ``synchronous_commit`` as the server has it (on).

What is measured, per concurrency level (sagas in flight):

* sagas/s and remote steps/s over the measured sagas (after a short warm-up);
* step latency: from the relay's ``bus.publish`` call for a command (before its confirm) to
  the moment the orchestrator's ``handle_reply`` returned for its reply, i.e. the reply's
  transition is committed. It excludes the outbox lag (commit of the transition that made the
  command -> relay publishes it); the saga latency includes everything;
* saga latency: ``start_saga`` called -> the terminal transition committed;
* with ``--fail-step``: every saga fails at its last step and compensates its two earlier
  steps; compensation latency is from the failed reply's commit to the ``compensated`` commit;
* CPU microseconds per remote step of this process (the orchestrator) and of the participant
  process, peak RSS of both, SQL statements and transactions per remote step;
* with ``--workers 2``: the same levels with this process alone, then with a second
  orchestrator process (``python -m sagas_core.cli worker``) consuming the same reply queue;
  completion is then detected by polling the database (20 ms), and the conflict count of
  both orchestrators is reported;
* with ``--memory``: RSS of this process with 100 and with 10,000 sagas waiting on replies
  that never come.

Usage: ``python -m bench.throughput [--levels 1,8,64] [--sagas 500] [--fail-step]
[--workers 2] [--memory] [--json out.json] [--profile out.prof]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import pstats
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import psycopg
import sqlalchemy as sa

from bench.support.measure import (
    AMQP_URL,
    DATABASE_URL,
    Result,
    cpu_seconds,
    load_average,
    machine,
    rss_mib,
    services_cpu_seconds,
    table,
    write_json,
)
from bench.support.processes import Child
from bench.support.remote import (
    SAGA,
    WAITING_SAGA,
    BenchData,
    OrderPlaced,
    bench_saga,
    waiting_saga,
)
from sagas_abstractions import Envelope, ReplyMessage, ReplyStatus, RouteKind, SagaStatus
from sagas_core import SagaRuntime
from sagas_core.codec import HEADER_KIND, HEADER_STEP
from sagas_core.runtime import run_event_loop, tune_gc
from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import sweep, unique_prefix
from sagas_sqlalchemy import SqlSagaStore

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sagas_core.engine import Decision

PARTICIPANT_CONCURRENCY = 64
POOL_SIZE = 16
SAGA_TIMEOUT = 60.0
TERMINAL = ("completed", "compensated", "failed", "resolved")


@dataclass
class Probe:
    """What the instrumented bus and orchestrator observed during one level."""

    published: dict[tuple[str, str, str], float] = field(default_factory=dict)
    done: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)
    compensation_ms: list[float] = field(default_factory=list)
    replies: int = 0

    def finish(self, saga_id: str) -> None:
        future = self.done.get(saga_id)
        if future is not None and not future.done():
            future.set_result(None)


class StatementCounter:
    """Counts SQL statements, explicit transactions and pool checkouts of this process.

    Statements are counted where psycopg sends them (every cursor execute: the store's
    hot-path statements, which run in autocommit mode, and SQLAlchemy's alike); transactions
    and checkouts are SQLAlchemy's (each transaction adds a ``BEGIN`` and a ``COMMIT`` round
    trip; with ``--pre-ping`` each checkout adds a ping).
    """

    def __init__(self, store: SqlSagaStore) -> None:
        self.statements = 0
        self.commits = 0
        self.checkouts = 0
        engine = store.engine.sync_engine
        sa.event.listen(engine, "commit", self._commit)
        sa.event.listen(engine.pool, "checkout", self._checkout)
        execute = psycopg.AsyncCursor.execute
        counter = self

        async def counted(cursor: Any, *args: Any, **kwargs: Any) -> Any:
            counter.statements += 1
            return await execute(cursor, *args, **kwargs)

        psycopg.AsyncCursor.execute = counted  # type: ignore[method-assign,assignment]

    def _checkout(self, *_: object) -> None:
        self.checkouts += 1

    def _commit(self, *_: object) -> None:
        self.commits += 1


class Bench:
    """The bench's fixtures: store, bus, participant process, and the probe they report to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = unique_prefix("bench")
        self.table_prefix = f"bench_{uuid.uuid4().hex[:8]}_"
        # Each process's connections carry an application name, so its backends can be found.
        self.application = f"sagas-{self.table_prefix}"
        self.store = SqlSagaStore.from_url(
            _with_application(args.database_url, f"{self.application}orch", args.pg_options),
            table_prefix=self.table_prefix,
            create_tables=True,
            pool_size=POOL_SIZE,
            max_overflow=0,
            **({"pool_pre_ping": True} if args.pre_ping else {}),
        )
        self.counter = StatementCounter(self.store)
        if args.no_group_commit and self.store._group is not None:  # noqa: SLF001 - experiment
            self.store._group._streams = 1 << 30  # noqa: SLF001 - every save finds a free stream
        self.probe = Probe()
        self.bus: RabbitBus | None = None
        self.participants: Child | None = None
        self.worker: Child | None = None
        self.runs = 0

    async def __aenter__(self) -> Self:
        try:
            await self._open()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open(self) -> None:
        await self.store.initialize()
        self.participants = await Child.start(
            "participants",
            "bench.support.participant_host",  # sagas_rabbitmq.host, on uvloop when installed
            "bench.support.remote:participants",
            "--url",
            self.args.amqp_url,
            "--prefix",
            self.prefix,
            "--concurrency",
            str(PARTICIPANT_CONCURRENCY),
            *(["--no-tune-gc"] if self.args.gc == "default" else []),
            env={"BENCH_LOOP": self.args.loop},
        )
        self.bus = await self.connect_bus()

    async def connect_bus(self) -> RabbitBus:
        """A bus whose command publishes the probe times (for the step latency)."""
        bus = await RabbitBus.connect(self.args.amqp_url, prefix=self.prefix)
        original = bus.publish

        async def publish(envelopes: Sequence[Envelope]) -> None:
            now = time.perf_counter()
            for envelope in envelopes:
                if envelope.route is RouteKind.COMMAND and envelope.correlation_id:
                    key = (envelope.correlation_id, envelope.headers[HEADER_STEP])
                    self.probe.published[(*key, envelope.headers[HEADER_KIND])] = now
            await original(envelopes)

        bus.publish = publish  # type: ignore[method-assign]
        return bus

    async def __aexit__(self, *_: object) -> None:
        for child in (self.worker, self.participants):
            if child is not None:
                await child.stop()
        if self.bus is not None:
            await self.bus.close()
        with contextlib.suppress(Exception):
            await sweep(self.args.amqp_url, self.prefix)
        await self.store.drop_tables()
        await self.store.close()

    def runtime(self, level: int, bus: RabbitBus) -> SagaRuntime:
        runtime = SagaRuntime(
            sagas=[bench_saga, waiting_saga],
            store=self.store,
            bus=bus,
            concurrency=max(level, 8),
            timeout_interval=self.args.timeout_interval,
            instance_cache=self.args.instance_cache,
            status_events=self.args.status_events,
        )
        orchestrator = runtime.orchestrator
        original = orchestrator.handle_reply

        async def handle_reply(
            reply: ReplyMessage, *, envelope: Envelope | None = None
        ) -> Decision | None:
            decision = await original(reply, envelope=envelope)
            now = time.perf_counter()
            probe = self.probe
            sent = probe.published.pop((reply.saga_id, reply.step, reply.kind.value), None)
            if decision is None:
                return None
            probe.replies += 1
            if sent is not None:
                probe.step_ms.append((now - sent) * 1000)
            status = decision.instance.status
            if reply.status is ReplyStatus.FAILED and status is SagaStatus.COMPENSATING:
                probe.failed_at[reply.saga_id] = now
            if not status.is_active:
                failed = probe.failed_at.pop(reply.saga_id, None)
                if status is SagaStatus.COMPENSATED and failed is not None:
                    probe.compensation_ms.append((now - failed) * 1000)
                probe.finish(reply.saga_id)
            return decision

        orchestrator.handle_reply = handle_reply  # type: ignore[method-assign]
        return runtime

    async def poll_completion(self, stop: asyncio.Event) -> None:
        """Resolve waiting sagas finished by another process (``--workers 2``)."""
        instances = self.store.tables.instances
        while not stop.is_set():
            waiting = [saga_id for saga_id, f in self.probe.done.items() if not f.done()]
            if waiting:
                async with self.store.engine.connect() as conn:
                    rows = await conn.scalars(
                        sa.select(instances.c.saga_id).where(
                            instances.c.saga_id.in_(waiting), instances.c.status.in_(TERMINAL)
                        )
                    )
                    for saga_id in rows:
                        self.probe.finish(saga_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    async def drive(
        self, runtime: SagaRuntime, level: int, count: int, saga_ms: list[float]
    ) -> None:
        gate = asyncio.Semaphore(level)
        loop = asyncio.get_running_loop()
        self.runs += 1
        run = self.runs

        async def one(index: int) -> None:
            async with gate:
                saga_id = f"{run}-{index}-{uuid.uuid4().hex[:8]}"
                future: asyncio.Future[None] = loop.create_future()
                self.probe.done[saga_id] = future
                began = time.perf_counter()
                if self.args.workers > 1:
                    # Started by an event every worker of the group competes for, so each
                    # worker starts (and, with reply affinity, carries) its share.
                    await runtime.publish_event(
                        OrderPlaced(order_id=saga_id, fail=self.args.fail_step),
                        message_id=f"placed-{saga_id}",
                    )
                else:
                    await runtime.start_saga(
                        SAGA, BenchData(order_id=saga_id, fail=self.args.fail_step), saga_id=saga_id
                    )
                await asyncio.wait_for(future, SAGA_TIMEOUT)
                saga_ms.append((time.perf_counter() - began) * 1000)
                del self.probe.done[saga_id]

        await asyncio.gather(*(one(index) for index in range(count)))

    async def level(self, level: int, count: int, *, impl: str, poll: bool = False) -> Result:
        # A bus of its own per level: a runtime subscribes to the OrderPlaced topic, and a
        # second subscription on one bus gets a queue of its own (RabbitBus numbers them), so
        # the queue of an earlier level's runtime would stay bound, unconsumed, and with
        # --workers 2 this process would read another queue than the second worker: every
        # event reached both, and each saga was started twice (one start a conflict and a load).
        bus = await self.connect_bus()
        try:
            return await self._level(level, count, bus, impl=impl, poll=poll)
        finally:
            await bus.close()

    async def _level(
        self, level: int, count: int, bus: RabbitBus, *, impl: str, poll: bool
    ) -> Result:
        runtime = self.runtime(level, bus)
        stop = asyncio.Event()
        poller = asyncio.create_task(self.poll_completion(stop)) if poll else None
        async with runtime:
            try:
                await self.drive(runtime, level, min(count, max(level * 2, 20)), [])  # warm-up
                self.probe = Probe()
                counter = self.counter
                statements, commits, checkouts = (
                    counter.statements,
                    counter.commits,
                    counter.checkouts,
                )
                conflicts = runtime.orchestrator.conflicts
                stale = runtime.orchestrator.stale_cache
                pids = {"orch": None, **self._child_pids()}
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                services_before = services_cpu_seconds()
                database = DatabaseProbe(self) if self.args.pg_stats else None
                if database is not None:
                    await database.begin()
                saga_ms: list[float] = []
                began = time.perf_counter()
                await self.drive(runtime, level, count, saga_ms)
                elapsed = time.perf_counter() - began
                cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
                services_after = services_cpu_seconds()
                cpu.update(
                    {name: services_after[name] - services_before[name] for name in services_after}
                )
                if database is not None:
                    cpu.update(await database.end())
            finally:
                stop.set()
                if poller is not None:
                    await poller
        per_saga = 5 if self.args.fail_step else 3
        steps = count * per_saga
        if database is not None:
            database.report(f"{impl} {level}", steps)
        return Result(
            impl=impl,
            level=level,
            sagas=count,
            seconds=elapsed,
            steps=steps,
            step_ms=self.probe.step_ms,
            saga_ms=saga_ms,
            compensation_ms=self.probe.compensation_ms,
            cpu={name: round(value, 3) for name, value in cpu.items()},
            rss_mib={name: round(rss_mib(pid)[1], 1) for name, pid in pids.items()},
            extra={
                "statements_per_step": round((self.counter.statements - statements) / steps, 2),
                "commits_per_step": round((self.counter.commits - commits) / steps, 2),
                "checkouts_per_step": round((self.counter.checkouts - checkouts) / steps, 2),
                "conflicts_here": runtime.orchestrator.conflicts - conflicts,
                "stale_cache_here": runtime.orchestrator.stale_cache - stale,
                "replies_here": self.probe.replies,
            },
            load=load_average(),
        )

    def _child_pids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {}
        if self.participants is not None:
            pids["part"] = self.participants.pid
        if self.worker is not None:
            pids["worker2"] = self.worker.pid
        return pids

    async def start_worker(self, stats: Path) -> None:
        env = {
            "SAGAS_DATABASE_URL": _with_application(
                self.args.database_url, f"{self.application}worker2", self.args.pg_options
            ),
            "SAGAS_TABLE_PREFIX": self.table_prefix,
            "SAGAS_AMQP_URL": self.args.amqp_url,
            "SAGAS_RABBITMQ_PREFIX": self.prefix,
            "SAGAS_CONCURRENCY": str(max(self.args.levels)),
            "SAGAS_LOG_LEVEL": "WARNING",
            "BENCH_LOOP": self.args.loop,
            "BENCH_STATS_FILE": str(stats),
            "SAGAS_TUNE_GC": "true" if self.args.gc == "worker" else "false",
        }
        self.worker = await Child.start(
            "worker2", "sagas_core.cli", "worker", "bench.support.worker_host:host", env=env
        )

    async def memory(self) -> dict[str, float]:
        """RSS of this process with 100 and with 10,000 sagas waiting on replies."""
        readings: dict[str, float] = {}
        runtime = SagaRuntime(
            sagas=[bench_saga, waiting_saga],
            store=self.store,
            bus=self.bus,
            instance_cache=self.args.instance_cache,
            status_events=self.args.status_events,
        )

        async def starter(indexes: Iterator[int]) -> None:
            for index in indexes:
                await runtime.start_saga(WAITING_SAGA, BenchData(order_id=f"wait-{index}"))

        async with runtime:
            started = 0
            for target in (100, self.args.memory_sagas):
                # 64 starters share the indexes: the driver holds 64 tasks, not one per saga
                # (10,000 pending tasks would weigh more than what is measured).
                indexes = iter(range(started, target))
                await asyncio.gather(*(starter(indexes) for _ in range(64)))
                started = target
                async with asyncio.timeout(300):
                    while await self.store.pending_count():  # noqa: ASYNC110 - polls the database
                        await asyncio.sleep(0.2)
                await asyncio.sleep(1)
                gc.collect()
                readings[f"rss_mib_at_{target}"] = round(rss_mib()[0], 1)
        readings["growth_mib"] = round(
            readings[f"rss_mib_at_{self.args.memory_sagas}"] - readings["rss_mib_at_100"], 1
        )
        return readings


def _with_application(url: str, name: str, options: str = "") -> str:
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{url}{'&' if '?' in url else '?'}application_name={name}"
    if options:
        url += "&options=" + urllib.parse.quote(" ".join(f"-c {o}" for o in options.split(",")))
    return url


class DatabaseProbe:
    """What the database did during one measured batch (``--pg-stats``).

    CPU of the run's own backends (by application name, per process), transactions of the
    bench's database, per-table scans and tuple counts, and every statement on the run's tables
    as pg_stat_statements saw it (reset at the start: keep other users off the server).
    """

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.url = bench.args.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.pids: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.database: tuple[int, ...] = ()
        self.tables: dict[str, tuple[int, ...]] = {}
        self.statements: list[tuple[Any, ...]] = []
        self.changes: dict[str, tuple[int, ...]] = {}
        self.plans: dict[str, tuple[int, int, int]] = {}
        self.statements_available = True

    async def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall()) if cursor.description else []

    async def _snapshot(self) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
        database = await self._query(
            "SELECT xact_commit, xact_rollback, blks_hit, blks_read, deadlocks, "
            "pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        tables = await self._query(
            "SELECT relname, seq_scan, seq_tup_read, idx_scan, n_tup_ins, n_tup_upd, "
            "n_tup_hot_upd, n_tup_del, n_dead_tup, n_live_tup FROM pg_stat_user_tables "
            "WHERE relname LIKE %s",
            f"{self.bench.table_prefix}%",
        )
        return (
            tuple(int(value) for value in database[0]),
            {row[0]: tuple(int(value) for value in row[1:]) for row in tables},
        )

    async def begin(self) -> None:
        rows = await self._query(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            f"{self.bench.application}%",
        )
        self.pids = {int(pid): name.removeprefix(self.bench.application) for pid, name in rows}
        self.cpu = {pid: _cpu_or_zero(pid) for pid in self.pids}
        self.plans = await self._prepared()
        try:
            await self._query("SELECT pg_stat_statements_reset()")
        except psycopg.Error:
            self.statements_available = False  # not preloaded or not created: the rest only
        await self._query("SELECT pg_stat_clear_snapshot()")
        self.database, self.tables = await self._snapshot()

    async def end(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, name in self.pids.items():
            used[f"db-{name}"] = used.get(f"db-{name}", 0.0) + _cpu_or_zero(pid) - self.cpu[pid]
        plans = await self._prepared()
        for name, (count, generic, custom) in plans.items():
            was = self.plans.get(name, (0, 0, 0))
            self.plans[name] = (count - was[0], generic - was[1], custom - was[2])
        await asyncio.sleep(0.6)  # the statistics collector's reports lag up to 500 ms
        database, tables = await self._snapshot()
        self.database = tuple(a - b for a, b in zip(database, self.database, strict=True))
        self.changes = {
            name: tuple(a - b for a, b in zip(row, self.tables.get(name, (0,) * 9), strict=True))
            for name, row in tables.items()
        }
        if not self.statements_available:
            return {name: round(value, 3) for name, value in used.items()}
        self.statements = await self._query(
            "SELECT calls, rows, total_exec_time, total_plan_time, plans, "
            "shared_blks_hit + shared_blks_read, left(regexp_replace(query, '\\s+', ' ', 'g'), 150)"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT 25"
        )
        return {name: round(value, 3) for name, value in used.items()}

    async def _prepared(self) -> dict[str, tuple[int, int, int]]:
        """Generic and custom plans of this process's prepared hot statements, summed."""
        lane = self.bench.store._lane  # noqa: SLF001 - a measurement of the store's own
        totals: dict[str, tuple[int, int, int]] = {}
        for conn in [] if lane is None else list(lane._idle):  # noqa: SLF001
            try:
                cursor = await conn.execute(
                    "SELECT left(regexp_replace(statement, '\\s+', ' ', 'g'), 60), "
                    "generic_plans, custom_plans FROM pg_prepared_statements"
                )
                found = await cursor.fetchall()
            except psycopg.Error:
                continue  # its backend went away (the lane replaces it on its next use)
            for text, generic, custom in found:
                name = str(text).replace(self.bench.table_prefix, "")
                a, b, c = totals.get(name, (0, 0, 0))
                totals[name] = (a + 1, b + int(generic), c + int(custom))
        return totals

    def report(self, title: str, steps: int) -> None:
        commits, rollbacks, hit, read, deadlocks, wal = self.database
        print(
            f"[pg] {title}: backends {sorted(self.pids.values())}; per step: "
            f"db commits {commits / steps:.2f} (rollbacks {rollbacks}), blocks "
            f"{(hit + read) / steps:.0f}, WAL {wal / steps:.0f} B; deadlocks {deadlocks}",
            file=sys.stderr,
        )
        prefix = self.bench.table_prefix
        for name, row in sorted(self.changes.items()):
            seq, seq_read, idx, ins, upd, hot, dele, dead, live = row
            print(
                f"[pg]   {name.removeprefix(prefix):<9} seq {seq} ({seq_read} rows) idx "
                f"{idx / steps:.2f}/step ins {ins} upd {upd} (hot {hot}) del {dele} "
                f"dead {dead:+} live {live:+}",
                file=sys.stderr,
            )
        for name, (count, generic, custom) in sorted(self.plans.items()):
            print(
                f"[pg]   prepared +{count}: generic {generic} custom {custom}  {name}",
                file=sys.stderr,
            )
        for calls, rows, exec_ms, plan_ms, plans, blocks, query in self.statements:
            print(
                f"[pg]   {calls / steps:6.3f}/step {rows / max(calls, 1):7.1f} rows "
                f"{exec_ms * 1000 / steps:7.1f} us/step exec {plan_ms * 1000 / steps:6.1f} plan "
                f"({plans} plans) {blocks / max(calls, 1):6.1f} blk  "
                f"{query.replace(prefix, '')}",
                file=sys.stderr,
            )


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0  # closed meanwhile


async def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    results: list[Result] = []
    meta: dict[str, Any] = {}
    async with Bench(args) as bench:
        impl = "ours-fail" if args.fail_step else "ours"
        if args.workers == 1:
            for level in args.levels:
                results.append(await bench.level(level, args.sagas, impl=impl))
                print(f"  measured {impl} at {level} in flight", file=sys.stderr)
        else:
            for level in args.levels:
                result = await bench.level(level, args.sagas, impl="1-worker", poll=True)
                results.append(result)
            with tempfile.TemporaryDirectory() as directory:
                stats = Path(directory) / "worker2.json"
                await bench.start_worker(stats)
                for level in args.levels:
                    result = await bench.level(level, args.sagas, impl="2-workers", poll=True)
                    results.append(result)
                assert bench.worker is not None
                await bench.worker.stop()
                bench.worker = None
                meta["worker2"] = json.loads(stats.read_text()) if stats.exists() else {}
        if args.memory:
            meta["memory"] = await bench.memory()
    return results, meta


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,64", help="sagas in flight, comma-separated")
    parser.add_argument("--sagas", type=int, default=300, help="measured sagas per level")
    parser.add_argument("--fail-step", action="store_true", help="fail the last step")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="worker: the garbage collector of ours' processes tuned as `sagas worker` tunes "
        "it (tune_gc); default: Python's own settings",
    )
    parser.add_argument("--memory", action="store_true", help="RSS at 100 vs 10,000 waiting")
    parser.add_argument("--memory-sagas", type=int, default=10_000)
    parser.add_argument(
        "--pre-ping",
        action="store_true",
        help="experiment: ping every pooled connection on checkout (pool_pre_ping)",
    )
    parser.add_argument(
        "--timeout-interval",
        type=float,
        default=0.05,
        help="seconds between deadline polls (SagaRuntime's default: 0.05)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio"),
        default="auto",
        help="event loop of this process and the participants (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--no-group-commit",
        action="store_true",
        help="experiment: write every save alone (no statement shared by several sagas)",
    )
    parser.add_argument(
        "--status-events",
        choices=("all", "lifecycle", "none"),
        default="all",
        help="status events published per saga (SagaRuntime's default: all; lifecycle: no "
        "per-step events)",
    )
    parser.add_argument(
        "--instance-cache",
        type=int,
        default=2048,
        help="sagas the orchestrator keeps in memory (SagaRuntime's default: 2048; 0: off)",
    )
    parser.add_argument(
        "--pg-stats",
        action="store_true",
        help="per level: this run's own backends' CPU (db-orch, db-worker2), commits, table "
        "scans and tuples, and the statements pg_stat_statements saw (needs it preloaded and "
        "created in the bench's database)",
    )
    parser.add_argument(
        "--pg-options",
        default="",
        help="experiment: server settings for every connection of both processes, "
        "comma-separated (e.g. plan_cache_mode=force_generic_plan)",
    )
    parser.add_argument("--database-url", default=DATABASE_URL)
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", help="cProfile this process into this file")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",") if level]
    return args


def report(results: list[Result], meta: dict[str, Any]) -> None:
    print(table(results))
    print("cpu us/step and rss: orch = this process, part = participants, worker2 = 2nd worker")
    for r in results:
        print(f"  {r.impl} {r.level}: {r.extra}")
    for key, value in meta.items():
        print(f"{key}: {value}")


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse(argv)
    print(f"machine: {machine()}")
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    if args.gc == "worker":
        tune_gc()  # as `sagas worker` does (the participant process gets it from its host)
    if args.loop == "asyncio":
        results, meta = asyncio.run(run(args))
    else:
        results, meta = run_event_loop(run(args))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    report(results, meta)
    if args.json:
        write_json(args.json, results, bench="throughput", **meta)
    return results


if __name__ == "__main__":
    main()
