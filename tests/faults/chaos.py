"""The fault-injection scenario, shared by ``tests/faults`` (short) and ``bench/soak.py`` (long).

One run:

1. Creates the run's tables (saga tables via the first worker's auto-migration, the ledger, the
   attempts log and the participant outcomes) and gives the run its own broker prefix.
2. Starts the participants (inventory, payments, shipping: a process each,
   ``python -m sagas_rabbitmq.host tests.faults.participants:<name>``) and two orchestrator
   workers (``python -m sagas_core.cli worker tests.faults.app:host``) competing on the same
   queues; the workers' database connections carry ``application_name=sagas-fault-<run>``.
3. Starts the sagas from this process through an :class:`Orchestrator` on the same store, in
   batches, with a fault of a seeded plan after each batch: SIGKILL of a worker or a
   participant (then a restart after a seeded down time), the run's broker connections closed,
   the workers' database backends terminated, and copies of already-sent commands published
   again with the same message id (duplicates, and reordered/late deliveries when the step has
   moved on). Every fault kind is bounded in count, the loop in time. Short step timeouts turn
   kills into timeouts, retries and late replies the engine must fence off.
4. Settles (bounded), drains (participants stopped first, then the workers, gracefully) and
   checks the ledger against the saga outcomes, the queues, the dead-letter queue and the outbox.

Only loopback services are used: whatever URLs the fixtures give (local by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sagas_abstractions import SagaStatus, StepKind
from sagas_core import Orchestrator, SystemClock, event_envelope
from sagas_core.builder import local_destination
from sagas_core.codec import HEADER_KIND, HEADER_STEP
from sagas_rabbitmq.testing import (
    close_connections,
    list_queues,
    rabbitmqctl,
    sweep,
    unique_prefix,
)
from sagas_rabbitmq.wire import header_text, to_amqp
from sagas_sqlalchemy import SqlIdempotencyStore, SqlSagaStore, build_outcomes_table
from samples.order_processing.messages import OrderData, OrderLine
from tests.faults.app import (
    FORWARD_STEPS,
    STEP_TIMEOUT,
    STEP_TIMEOUT_ENV,
    UNDO_EFFECTS,
    OrderPlaced,
    fault_saga,
)
from tests.faults.participants import (
    DATABASE_URL_ENV,
    DECLINED_CARD,
    HANDLER_DELAY_ENV,
    NO_REFUND_CARD,
    TABLE_PREFIX_ENV,
    UNKNOWN_SKU,
    UNSERVED_REGION,
    fault_tables,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

ROOT = Path(__file__).resolve().parents[2]
SEED_ENV = "SAGAS_FAULT_SEED"
DEFAULT_SEED = 20261125
SERVICES = ("inventory", "payments", "shipping")
TAP_SAMPLE = 400  # commands looked at (from the oldest) to choose the ones sent again
BROKER_RESTART_ENV = "SAGAS_FAULT_BROKER_RESTART"


def fault_kinds() -> tuple[str, ...]:
    """The fault kinds of a run: the broker restart only when ``SAGAS_FAULT_BROKER_RESTART=1``.

    Restarting the broker app disturbs everything else using that broker, so it is opt-in;
    CI, which owns the machine's broker for its run, turns it on.
    """
    kinds: tuple[str, ...] = (
        "kill_worker",
        "kill_participant",
        "close_connections",
        "terminate_db",
        "duplicate",
    )
    if os.environ.get(BROKER_RESTART_ENV) == "1":
        kinds += ("restart_broker",)
    return kinds


FAULT_KINDS = fault_kinds()
GROUP = "faults"
DELIVERY_LIMIT = 20  # chaos alone (kills, closed connections) must never dead-letter a command
READY_WITHIN = 45.0
STOP_WITHIN = 20.0
ACTIVE = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


def seed_from_env() -> int:
    """``SAGAS_FAULT_SEED`` when set, else the fixed default."""
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else DEFAULT_SEED


@dataclass(frozen=True)
class ChaosConfig:
    """How big and how long one run is.

    Attributes:
        seed: Seeds every random choice of the run (orders, fault kinds, targets, pauses).
        sagas: Sagas started.
        seconds: Upper bound of the chaos loop (it ends earlier once every saga is done).
        max_per_kind: Each fault kind is injected at most this often.
        workers: Orchestrator worker processes competing on the queues.
        settle_within: Seconds the sagas get to end after the chaos loop.
        feed_share: Share of ``seconds`` scheduled for starting the sagas (in batches, a fault
            after each batch); delays from waiting on restarts eat into the rest.
    """

    seed: int
    sagas: int = 60
    seconds: float = 20.0
    max_per_kind: int = 2
    workers: int = 2
    settle_within: float = 45.0
    feed_share: float = 0.6


@dataclass
class Report:
    """What a run found; :meth:`summary` is its one-line figure."""

    seed: int
    sagas: int
    faults: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    double: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    handler_runs: int = 0
    rolled_back: int = 0
    timeouts: int = 0
    stale: int = 0
    effects: int = 0
    dead_letters: int = 0
    started_by_event: int = 0
    settle: float = 0.0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing lost, doubled, stuck, and no process died by itself."""
        return not (self.lost or self.double or self.stuck or self.crashed)

    def summary(self) -> str:
        """``faults seed=... sagas=... faults={...} lost=0 double=0 stuck=0 settle=...s``."""
        faults = ", ".join(f"{kind}: {self.faults[kind]}" for kind in FAULT_KINDS)
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        return (
            f"faults seed={self.seed} sagas={self.sagas} faults={{{faults}}} "
            f"lost={len(self.lost)} double={len(self.double)} stuck={len(self.stuck)} "
            f"settle={self.settle:.1f}s outcomes={{{outcomes}}} crashed={len(self.crashed)} "
            f"timeouts={self.timeouts} stale_inputs={self.stale} handler_runs={self.handler_runs} "
            f"effects={self.effects} rolled_back={self.rolled_back} "
            f"dead_letters={self.dead_letters} started_by_event={self.started_by_event} "
            f"total={self.elapsed:.1f}s"
        )

    def details(self, limit: int = 40) -> str:
        """Every problem (bounded), for an assertion message."""
        lines = [f"seed={self.seed} (rerun with {SEED_ENV}={self.seed})"]
        for name in ("lost", "double", "stuck", "crashed", "notes", "events"):
            items: list[str] = getattr(self, name)
            lines.extend(f"  {name}: {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"  {name}: ... {len(items) - limit} more")
        return "\n".join(lines)


def emit(line: str) -> None:
    """Write ``line`` to the real stdout (visible whatever pytest captures)."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()


def with_application_name(url: str, name: str) -> str:
    """``url`` with ``application_name=name`` in its query (psycopg passes it to the server)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


# ---------------------------------------------------------------------- orders


@dataclass(frozen=True)
class Order:
    """One saga to start, and whether it can complete at all."""

    saga_id: str
    data: OrderData
    doomed: str | None
    """Why it must not complete (a seeded permanent failure), or ``None``."""


def make_orders(rng: random.Random, run: str, count: int) -> list[Order]:
    """``count`` orders; over a third carry a permanent failure (card, SKU, region, refund)."""
    orders = []
    for index in range(count):
        doomed = rng.choices(
            [None, "declined", "unknown_sku", "unserved", "unrefundable"],
            weights=[12, 4, 2, 2, 1],
            k=1,
        )[0]
        lines = [
            OrderLine(
                sku=rng.choice(["BOOK-1", "LAMP-2", "PEN-4"]),
                quantity=rng.randint(1, 3),
                unit_price=Decimal(rng.randint(100, 9999)) / 100,
            )
        ]
        if doomed == "unknown_sku":
            lines.append(OrderLine(sku=UNKNOWN_SKU, quantity=1, unit_price=Decimal("1.00")))
        data = OrderData(
            order_id=f"order-{index:04d}",
            customer_id=f"customer-{rng.randint(1, 20)}",
            lines=lines,
            card_token={"declined": DECLINED_CARD, "unrefundable": NO_REFUND_CARD}.get(
                doomed or "", "tok_ok"
            ),
            region=UNSERVED_REGION if doomed in ("unserved", "unrefundable") else "eu-west",
            address=f"{index} Loopback Lane",
        )
        orders.append(Order(f"{run}-{index:04d}", data, doomed))
    return orders


# ---------------------------------------------------------------------- processes


class Processes:
    """The run's worker and participant processes (stdout says ``ready``; stderr to a file)."""

    def __init__(
        self,
        directory: Path,
        worker_env: dict[str, str],
        participant_env: dict[str, str],
        amqp_url: str,
        prefix: str,
    ) -> None:
        self.directory = directory
        self.worker_env = worker_env
        self.participant_env = participant_env
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.participant_concurrency = 4
        """Handlers at once per participant process (the memory soak raises it)."""
        self.running: dict[str, asyncio.subprocess.Process] = {}
        self.starts: Counter[str] = Counter()
        self._logs: list[IO[bytes]] = []

    def log_tail(self, name: str, size: int = 3000) -> str:
        """The end of process ``name``'s log."""
        path = self.directory / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-size:] if path.exists() else ""

    def _command(self, name: str) -> list[str]:
        if name.startswith("worker"):
            return [sys.executable, "-m", "sagas_core.cli", "worker", "tests.faults.app:host"]
        return [
            sys.executable, "-m", "sagas_rabbitmq.host", f"tests.faults.participants:{name}",
            "--url", self.amqp_url, "--prefix", self.prefix,
            "--delivery-limit", str(DELIVERY_LIMIT), "--group", "participants",
            "--concurrency", str(self.participant_concurrency),
        ]  # fmt: skip

    async def start(self, name: str) -> None:
        """Start process ``name`` (``worker-<n>`` or a service) and wait for its ``ready``."""
        log = (self.directory / f"{name}.log").open("ab")
        self._logs.append(log)
        env = self.worker_env if name.startswith("worker") else self.participant_env
        process = await asyncio.create_subprocess_exec(
            *self._command(name),
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        self.running[name] = process
        self.starts[name] += 1
        assert process.stdout is not None
        try:
            async with asyncio.timeout(READY_WITHIN):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b"<no ready line in time>"
        if line != b"ready\n":
            raise RuntimeError(f"{name} did not start ({line!r}):\n{self.log_tail(name)}")

    async def kill(self, name: str) -> None:
        """SIGKILL process ``name``: no clean-up, work in flight unacknowledged."""
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        async with asyncio.timeout(STOP_WITHIN):
            await process.wait()

    def exited(self) -> dict[str, int]:
        """Processes that ended by themselves, with their exit status."""
        return {
            name: process.returncode
            for name, process in self.running.items()
            if process.returncode is not None
        }

    async def terminate(self, names: list[str]) -> dict[str, int | None]:
        """SIGTERM ``names`` and wait (bounded); returns their exit statuses."""
        chosen = {name: self.running.pop(name) for name in names if name in self.running}
        for process in chosen.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        statuses: dict[str, int | None] = {}
        for name, process in chosen.items():
            try:
                async with asyncio.timeout(STOP_WITHIN):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            statuses[name] = process.returncode
        return statuses

    async def close(self) -> None:
        """Kill whatever still runs and close the log files (always safe to call)."""
        for process in self.running.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for process in self.running.values():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WITHIN):
                    await process.wait()
        self.running.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


# ---------------------------------------------------------------------- the run


class Run:
    """One fault run: its names, processes, store and checks."""

    def __init__(
        self, config: ChaosConfig, postgres_url: str, amqp_url: str, directory: Path
    ) -> None:
        self.config = config
        self.postgres_url = postgres_url
        self.amqp_url = amqp_url
        self.directory = directory
        self.rng = random.Random(config.seed)
        # Its own stream, so the event duplicates do not change a seed's fault plan.
        self.event_rng = random.Random(f"{config.seed}-events")
        self.placed: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = unique_prefix("sagas-faults")
        self.table_prefix = f"flt{self.run_id}_"
        self.app_name = f"sagas-fault-{self.run_id}"
        self.report = Report(seed=config.seed, sagas=config.sagas)
        self.tables = fault_tables(self.table_prefix)
        self.orders = make_orders(self.rng, self.run_id, config.sagas)
        self.started: list[str] = []
        self._letters_to_explain: dict[str, list[str]] = {}
        self._background: dict[str, asyncio.Task[None]] = {}
        self._queue_names: set[str] = set()
        self.began = time.monotonic()
        self.last_event_at = self.fed_at = self.began
        self.done_at: float | None = None
        self.out: Callable[[str], None] = emit
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAS_", "FAULTS_"))}
        base["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        worker_env = {
            **base,
            "SAGAS_DATABASE_URL": with_application_name(postgres_url, self.app_name),
            "SAGAS_TABLE_PREFIX": self.table_prefix,
            "SAGAS_AUTO_MIGRATE": "1",
            "SAGAS_AMQP_URL": amqp_url,
            "SAGAS_RABBITMQ_PREFIX": self.prefix,
            "SAGAS_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
            "SAGAS_GROUP": GROUP,
            "SAGAS_CONCURRENCY": "8",
            "SAGAS_TIMEOUT_INTERVAL": "0.1",
            "SAGAS_GRACEFUL_TIMEOUT": "10",
            "SAGAS_LOG_LEVEL": "WARNING",
            STEP_TIMEOUT_ENV: str(STEP_TIMEOUT),
        }
        participant_env = {
            **base,
            DATABASE_URL_ENV: with_application_name(postgres_url, f"sagas-faultp-{self.run_id}"),
            TABLE_PREFIX_ENV: self.table_prefix,
            HANDLER_DELAY_ENV: "0.3",
        }
        self.processes = Processes(directory, worker_env, participant_env, amqp_url, self.prefix)
        self.workers = [f"worker-{n}" for n in range(1, config.workers + 1)]
        self.engine: AsyncEngine = create_async_engine(
            with_application_name(postgres_url, f"sagas-faultt-{self.run_id}"), pool_size=3
        )
        self.store = SqlSagaStore.from_url(postgres_url, table_prefix=self.table_prefix)
        self.orchestrator = Orchestrator(
            store=self.store, definitions=[fault_saga], clock=SystemClock(), group=GROUP
        )

    # ------------------------------------------------------------------ set-up / tear-down

    async def setup(self) -> None:
        """Create the participant tables, start the participants and the workers."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.tables.metadata.create_all)
        outcomes = SqlIdempotencyStore(self.engine, table_name=self.tables.outcomes_name)
        await outcomes.create_table()
        # The first worker migrates the saga tables; the others start once they exist.
        await self.processes.start(self.workers[0])
        await asyncio.gather(
            *(self.processes.start(name) for name in [*self.workers[1:], *SERVICES])
        )
        await self._tap_commands()

    async def _broker(self, name: str, *, timeout: float = 10) -> aio_pika.abc.AbstractConnection:
        """A connection of the suite itself, named for ``rabbitmqctl list_connections``."""
        return await aio_pika.connect(
            self.amqp_url, timeout=timeout, client_properties={"connection_name": name}
        )

    @property
    def tap(self) -> str:
        """A queue that keeps a copy of every command (the duplicate fault sends them again)."""
        return f"{self.prefix}.faults-tap"

    async def _tap_commands(self) -> None:
        """Bind :attr:`tap` to the commands exchange for every destination of the saga.

        Published commands leave the outbox, so copies are taken on the broker side. The tap is
        a durable classic queue (it survives broker restarts) nobody consumes; it is deleted
        before the run drains.
        """
        connection = await self._broker("faults-tap")
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{self.prefix}.commands", ensure=False)
            queue = await channel.declare_queue(
                self.tap, durable=True, arguments={"x-queue-type": "classic"}
            )
            for destination in (*SERVICES, local_destination(fault_saga.name)):
                await queue.bind(exchange, routing_key=destination)

    async def cleanup(self) -> None:
        """Kill the processes, delete the run's queues, exchanges and tables. Never raises."""
        for task in self._background.values():
            task.cancel()
        await asyncio.gather(*self._background.values(), return_exceptions=True)
        self._background.clear()
        with contextlib.suppress(Exception):
            await self.processes.close()
        try:
            await sweep(self.amqp_url, f"{self.prefix}.")
        except Exception as exc:  # noqa: BLE001 - clean-up goes on
            self.out(f"faults: sweeping {self.prefix} failed: {exc!r}")
        try:
            await self.store.close()
            async with self.engine.begin() as conn:
                names = (
                    await conn.execute(
                        sa.text(
                            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                            "AND starts_with(tablename, :prefix)"
                        ),
                        {"prefix": self.table_prefix},
                    )
                ).scalars()
                for name in list(names):
                    await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))
        except Exception as exc:  # noqa: BLE001 - clean-up goes on
            self.out(f"faults: dropping tables {self.table_prefix}* failed: {exc!r}")
        finally:
            await self.engine.dispose()

    # ------------------------------------------------------------------ reading state

    async def statuses(self) -> dict[str, str]:
        """``{saga_id: status}`` of the run's sagas, straight from the instances table."""
        table = self.store.tables.instances
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(table.c.saga_id, table.c.status))
            return {row.saga_id: row.status for row in rows}

    async def active(self) -> int:
        """Started sagas not done yet (not yet started ones count too)."""
        statuses = await self.statuses()
        unstarted = self.config.sagas - len(self.started)
        return unstarted + sum(1 for s in statuses.values() if s in ACTIVE)

    # ------------------------------------------------------------------ load and chaos

    async def feed(self, orders: list[Order], until: float) -> None:
        """Start ``orders``, spread evenly until the monotonic time ``until``.

        Every other order is started the way another service would start it: an ``OrderPlaced``
        event on the broker, now and then published twice; the rest through the orchestrator.
        """
        for index, order in enumerate(orders):
            if index % 2:
                await self._place(order)
                self.placed.append(order.saga_id)
            else:
                await self.orchestrator.start(
                    fault_saga,
                    order.data,
                    saga_id=order.saga_id,
                    correlation_id=order.data.order_id,
                )
            self.started.append(order.saga_id)
            left = until - time.monotonic()
            if left > 0:
                await asyncio.sleep(left / (len(orders) - index))
        self.fed_at = time.monotonic()

    async def _place(self, order: Order) -> None:
        """Publish ``OrderPlaced`` for ``order`` (confirmed), retrying while the broker is away."""
        event = OrderPlaced(saga_id=order.saga_id, **order.data.model_dump())
        envelope = event_envelope(event, message_id=f"placed-{order.saga_id}")
        copies = 2 if self.event_rng.random() < 1 / 3 else 1
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = await self._broker("faults-shop", timeout=5)
                async with connection:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    exchange = await channel.get_exchange(f"{self.prefix}.events", ensure=False)
                    for _ in range(copies):
                        await exchange.publish(
                            to_amqp(envelope), routing_key=envelope.key, mandatory=True, timeout=10
                        )
            except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                self.out(f"faults: publishing OrderPlaced for {order.saga_id} failed ({exc!r})")
                await asyncio.sleep(0.5)
            else:
                return

    def event(self, what: str) -> None:
        """Note what the chaos loop did, and when (printed with any failure)."""
        self.last_event_at = time.monotonic()
        self.report.events.append(f"{self.last_event_at - self.began:6.1f}s {what}")

    async def chaos(self) -> None:
        """Start the sagas in batches with a seeded plan of faults between them.

        The plan holds every kind ``max_per_kind`` times in a seeded order. Batch ``i`` of the
        sagas is started over slot ``i`` of the schedule and fault ``i`` follows it, so every
        fault hits sagas in flight. Restarts after a kill run in the background (after a seeded
        down time), so faults overlap. Past ``seconds`` no fault is injected any more (the
        sagas left are started at once); then the loop waits for the sagas to end, still
        bounded by ``seconds``.
        """
        config = self.config
        deadline = time.monotonic() + config.seconds
        actions: dict[str, Callable[[], Awaitable[bool]]] = {
            "kill_worker": self._kill_worker,
            "kill_participant": self._kill_participant,
            "close_connections": self._close_connections,
            "terminate_db": self._terminate_db,
            "duplicate": self._duplicate,
            "restart_broker": self._restart_broker,
        }
        plan = [kind for kind in FAULT_KINDS for _ in range(config.max_per_kind)]
        self.rng.shuffle(plan)
        slots = len(plan) + 1
        slot = config.seconds * config.feed_share / slots
        batches = [self.orders[i * len(self.orders) // slots : (i + 1) * len(self.orders) // slots]
                   for i in range(slots)]  # fmt: skip
        began = time.monotonic()
        try:
            for index, kind in enumerate(plan):
                await self.feed(batches[index], until=began + (index + 1) * slot)
                await self._revive()
                if time.monotonic() >= deadline:
                    self.event(f"time is up: {len(plan) - index} fault(s) of the plan left out")
                    break
                if await actions[kind]():
                    self.report.faults[kind] += 1
            await self.feed([o for o in self.orders if o.saga_id not in set(self.started)],
                            until=min(deadline, time.monotonic() + slot))  # fmt: skip
            while time.monotonic() < deadline and not await self.all_done():
                await self._revive()
                await asyncio.sleep(0.2)
        finally:
            await self._join_background()

    async def _join_background(self, names: list[str] | None = None) -> None:
        """Wait for the background work (restarts, a connection closing) of ``names`` (or all).

        A process starting up treats a lost broker or database connection as fatal (it exits
        with status 1, by design: a supervisor restarts it), so the faults that cut connections
        wait for restarts to finish, and a restart waits for a connection closing to finish.
        """
        for name in list(self._background) if names is None else names:
            task = self._background.pop(name, None)
            if task is not None:
                async with asyncio.timeout(READY_WITHIN + STOP_WITHIN):
                    await task

    def _in_background(self, name: str, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        self._background[name] = asyncio.create_task(run(), name=f"faults-{name}")

    async def _revive(self) -> None:
        """A process that died by itself is a finding: record it, then start it again."""
        for name, status in self.processes.exited().items():
            self.report.crashed.append(
                f"{name} exited by itself with status {status}:\n{self.processes.log_tail(name)}"
            )
            self.event(f"{name} found dead (status {status}); restarting it")
            self.processes.running.pop(name)
            await self.processes.start(name)

    async def _kill(self, candidates: list[str]) -> bool:
        name = self.rng.choice(candidates)
        down = self.rng.uniform(0.1, 1.5)
        await self._join_background([name, "broker"])
        when = ""
        if name in SERVICES:
            busy = await self._handler_in_flight(name, within=2.0)
            when = " mid-handler" if busy else " (no handler seen in flight)"
        else:
            unsent = await self._outbox_unsent(within=1.0)
            when = f" with {unsent} committed message(s) not yet published"
        await self.processes.kill(name)
        self.event(f"SIGKILL {name}{when}; restart in {down:.1f}s")

        async def restart() -> None:
            await asyncio.sleep(down)
            await self.processes.start(name)
            self.event(f"{name} ready again")

        self._in_background(name, restart())
        return True

    async def _handler_in_flight(self, name: str, within: float) -> bool:
        """Wait (bounded) until participant ``name`` runs a handler that has not committed.

        Its handlers log a ``run`` row before writing their effect and then hold the
        transaction open a little: a fresh ``run`` row whose outcome is not recorded yet is a
        handler in flight, so a SIGKILL now lands mid-handler (its transaction must roll back,
        effect included).
        """
        pid = self.processes.running[name].pid
        attempts = self.tables.attempts
        outcomes = build_outcomes_table(self.tables.outcomes_name)
        fresh = (
            sa.select(sa.func.count())
            .select_from(attempts)
            .where(
                attempts.c.pid == pid,
                attempts.c.note == "run",
                attempts.c.at > sa.func.now() - sa.text("interval '80 milliseconds'"),
                ~sa.exists().where(outcomes.c.key == attempts.c.idempotency_key),
            )
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                if await conn.scalar(fresh):
                    return True
            await asyncio.sleep(0.02)
        return False

    async def _outbox_unsent(self, within: float) -> int:
        """Wait (bounded) until the outbox holds committed, unpublished messages; how many.

        A worker killed then may die between a commit and its publish (the relay of the next
        worker must send those after the lease).
        """
        outbox = self.store.tables.outbox
        unsent = sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        deadline = time.monotonic() + within
        count = 0
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                count = int(await conn.scalar(unsent) or 0)
            if count:
                break
            await asyncio.sleep(0.01)
        return count

    async def _kill_worker(self) -> bool:
        return await self._kill(self.workers)

    async def _kill_participant(self) -> bool:
        return await self._kill(list(SERVICES))

    async def _close_connections(self) -> bool:
        await self._join_background()

        async def close() -> None:
            try:
                closed = await asyncio.to_thread(close_connections, self.prefix, "fault injection")
            except (OSError, subprocess.SubprocessError) as exc:  # rabbitmqctl itself failed
                self.event(f"closing broker connections failed: {exc!r}")
                return
            self.event(f"closed {closed} broker connection(s)")

        self.event("closing the run's broker connections")
        self._in_background("broker", close())
        return True

    async def _restart_broker(self) -> bool:
        """Stop the broker app for a seeded moment, then start it again (in the background).

        Every process keeps running and must reconnect by itself; process restarts and
        connection faults wait for the broker to be back (they join the ``broker`` task).
        """
        await self._join_background()
        down = self.rng.uniform(0.5, 2.0)

        async def restart() -> None:
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            self.event(f"broker app stopped for {down:.1f}s")
            try:
                await asyncio.sleep(down)
            finally:
                await asyncio.to_thread(rabbitmqctl, "start_app")
                await asyncio.to_thread(rabbitmqctl, "await_startup")
                self.event("broker app started again")

        self._in_background("broker", restart())
        return True

    async def _terminate_db(self) -> bool:
        await self._join_background(self.workers)
        async with self.engine.connect() as conn:
            killed = await conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": self.app_name},
            )
            await conn.commit()
        self.event(f"terminated {killed} worker database backend(s)")
        return bool(killed)

    async def _duplicate(self) -> bool:
        """Publish copies of sent commands again, same message id, straight to the exchange."""
        await self._join_background(["broker"])
        connection = await self._broker("faults-duplicator")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            tap = await channel.declare_queue(self.tap, passive=True)
            taken: list[aio_pika.abc.AbstractIncomingMessage] = []
            while len(taken) < TAP_SAMPLE and (
                message := await tap.get(no_ack=False, fail=False, timeout=5)
            ):
                taken.append(message)
            chosen = self.rng.sample(taken, k=min(len(taken), self.rng.randint(2, 6)))
            exchange = await channel.get_exchange(f"{self.prefix}.commands", ensure=False)
            for message in chosen:
                again = aio_pika.Message(
                    message.body,
                    headers=message.headers,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                    reply_to=message.reply_to,
                    timestamp=message.timestamp,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(again, routing_key=message.routing_key or "", timeout=10)
            for message in taken:
                await message.nack(requeue=True)  # kept for the next duplicate fault
        if not chosen:
            self.event("duplicate skipped: no command sent yet")
            return False
        self.event(
            "published again: "
            + ", ".join(f"{m.type}#{(m.message_id or '')[-24:]}" for m in chosen)
        )
        return True

    # ------------------------------------------------------------------ settling

    async def all_done(self) -> bool:
        """Whether every saga was started and has ended (notes when that was first seen)."""
        if self.done_at is None and await self.active() == 0:
            self.done_at = time.monotonic()
        return self.done_at is not None

    async def settle(self) -> None:
        """Wait (bounded) until every saga has ended.

        The settle time runs from the later of the last chaos event (a fault, or a process
        ready again) and the last saga started, to every saga ended.
        """
        deadline = time.monotonic() + self.config.settle_within
        while not await self.all_done() and time.monotonic() < deadline:
            await self._revive()
            await asyncio.sleep(0.2)
        end = self.done_at or time.monotonic()
        self.report.settle = max(0.0, end - max(self.last_event_at, self.fed_at))

    async def queue_counts(self, *, relist: bool = False) -> dict[str, int]:
        """``{queue: messages}`` of every queue of the run (ready only, while consumed)."""
        if relist or not self._queue_names:
            self._queue_names = set(await asyncio.to_thread(list_queues, f"{self.prefix}."))
        names = self._queue_names
        counts = {}
        connection = await self._broker("faults-inspector")
        async with connection:
            channel = await connection.channel()
            for name in sorted(names):
                declared = await channel.declare_queue(name, passive=True)
                counts[name] = declared.declaration_result.message_count or 0
        return counts

    async def _untap(self) -> None:
        """Delete the tap (its copies are not work left undone)."""
        connection = await self._broker("faults-tap")
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(self.tap)
        self._queue_names = set()  # listed again without it

    async def _wait_empty(self, within: float, *, queues: Callable[[str], bool]) -> None:
        """Wait until the chosen queues hold nothing twice in a row (bounded, best effort)."""
        deadline = time.monotonic() + within
        quiet = 0
        while time.monotonic() < deadline and quiet < 2:
            counts = await self.queue_counts()
            pending = await self.store.pending_count()
            busy = pending + sum(n for name, n in counts.items() if queues(name))
            quiet = quiet + 1 if busy == 0 else 0
            await asyncio.sleep(0.5)

    async def drain(self) -> tuple[dict[str, int], list[aio_pika.abc.AbstractIncomingMessage]]:
        """Stop participants, then workers, gracefully; return what the queues still hold."""
        dead_letter = f"{self.prefix}.dead-letter"
        await self._untap()
        await self._wait_empty(20.0, queues=lambda name: name != dead_letter)
        services = await self.processes.terminate(list(SERVICES))
        # Replies the participants sent last are consumed by the workers still running.
        await self._wait_empty(10.0, queues=lambda name: ".replies." in name)
        workers = await self.processes.terminate(list(self.workers))
        for name, status in {**services, **workers}.items():
            if status != 0:
                self.report.crashed.append(
                    f"{name} exited with {status} on SIGTERM:\n{self.processes.log_tail(name)}"
                )
        counts = await self.queue_counts(relist=True)
        letters: list[aio_pika.abc.AbstractIncomingMessage] = []
        connection = await self._broker("faults-inspector")
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(dead_letter, passive=True)
            while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
                letters.append(message)
        return counts, letters

    # ------------------------------------------------------------------ the check

    async def check(
        self, counts: dict[str, int], letters: list[aio_pika.abc.AbstractIncomingMessage]
    ) -> None:
        """Account for every saga, effect and message of the run."""
        report = self.report
        statuses = await self.statuses()
        report.outcomes = Counter(statuses.values())
        ledger, attempts = self.tables.ledger, self.tables.attempts
        async with self.engine.connect() as conn:
            effects = (
                await conn.execute(
                    sa.select(ledger.c.saga_id, ledger.c.step, ledger.c.kind, ledger.c.effect)
                )
            ).all()
            notes = (await conn.execute(sa.select(attempts.c.saga_id, attempts.c.note))).all()
            history = self.store.tables.history
            inputs = (
                await conn.execute(
                    sa.select(
                        history.c.saga_id, history.c.input, history.c.outcome, history.c.actor
                    )
                )
            ).all()
        # Every event-started saga started once, from its event (duplicates started nothing).
        starts = Counter(row.saga_id for row in inputs if row.input == "Start")
        by_event = {row.saga_id for row in inputs if row.actor == "event:OrderPlaced"}
        report.started_by_event = len(by_event)
        report.double.extend(
            f"{saga_id}: started {n} times" for saga_id, n in starts.items() if n > 1
        )
        report.lost.extend(
            f"{saga_id}: its OrderPlaced event did not start it"
            for saga_id in self.placed
            if saga_id not in by_event
        )
        report.timeouts = sum(
            1 for row in inputs if row.input == "Timeout" and row.outcome == "applied"
        )
        report.stale = sum(1 for row in inputs if row.outcome == "stale")
        report.effects = len(effects)
        report.handler_runs = sum(1 for note in notes if note.note == "run")
        answered = sum(1 for note in notes if note.note in ("noop", "refused"))
        report.rolled_back = report.handler_runs - report.effects - answered
        report.double.extend(
            f"{note.saga_id}: a second effect was attempted (unique key hit)"
            for note in notes
            if note.note == "duplicate"
        )
        applied: dict[str, dict[tuple[str, str], str]] = {}
        for row in effects:
            applied.setdefault(row.saga_id, {})[(row.step, row.kind)] = row.effect
        known = {order.saga_id for order in self.orders}
        report.double.extend(
            f"{saga_id}: effects for a saga this run never started"
            for saga_id in applied
            if saga_id not in known
        )
        report.dead_letters = len(letters)
        lettered = self._dead_letters(letters)
        for order in self.orders:
            self._check_saga(order, statuses.get(order.saga_id), applied.get(order.saga_id, {}),
                             lettered.pop(order.saga_id, []))  # fmt: skip
        for saga_id, kinds in lettered.items():
            report.stuck.append(f"dead letter(s) {kinds} for unknown saga {saga_id}")
        dead_letter = f"{self.prefix}.dead-letter"
        report.stuck.extend(
            f"{count} message(s) left in {name}"
            for name, count in counts.items()
            if count and name != dead_letter
        )
        pending = await self.store.pending_count()
        if pending:
            report.stuck.append(f"outbox not drained: {pending} record(s) unsent")

    def _dead_letters(
        self, letters: list[aio_pika.abc.AbstractIncomingMessage]
    ) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for message in letters:
            headers = {k: header_text(v) for k, v in (message.headers or {}).items()}
            kind = headers.get(HEADER_KIND, "?")
            what = f"{message.type}@{headers.get(HEADER_STEP, '?')}/{kind}"
            if kind != StepKind.COMPENSATE.value:
                # Only a parked compensation belongs there: anything else was given up on.
                self.report.stuck.append(
                    f"dead letter {message.message_id} ({what}) of saga {message.correlation_id} "
                    f"is no parked compensation: {headers}"
                )
                continue
            found.setdefault(message.correlation_id or "?", []).append(what)
        return found

    def _check_saga(
        self,
        order: Order,
        status: str | None,
        applied: dict[tuple[str, str], str],
        letters: list[str],
    ) -> None:
        report, saga_id = self.report, order.saga_id
        if status is None:
            report.lost.append(f"{saga_id}: started, but not in the store")
            return
        for step in FORWARD_STEPS:
            if (step, "compensate") in applied and (step, "execute") not in applied:
                report.double.append(f"{saga_id}: {step} undone but never applied")
        if status in ACTIVE:
            report.stuck.append(f"{saga_id}: still {status} after settling")
        elif status == SagaStatus.COMPLETED.value:
            if order.doomed:
                report.double.append(f"{saga_id}: completed although {order.doomed}")
            for step, effect in FORWARD_STEPS.items():
                if (step, "execute") not in applied:
                    report.lost.append(f"{saga_id}: completed without its {effect}")
                if (step, "compensate") in applied:
                    report.double.append(f"{saga_id}: completed but {step} was undone")
        elif status == SagaStatus.COMPENSATED.value:
            for step, effect in FORWARD_STEPS.items():
                if (step, "execute") in applied and (step, "compensate") not in applied:
                    report.lost.append(
                        f"{saga_id}: compensated, but its {effect} has no {UNDO_EFFECTS[step]}"
                    )
        elif status == SagaStatus.FAILED.value:
            if not letters:
                report.lost.append(f"{saga_id}: failed without a dead letter")
        else:
            report.stuck.append(f"{saga_id}: unexpected status {status}")
        if letters and status != SagaStatus.FAILED.value:
            # A saga parked, then a late reply of its last compensation moved it on: the dead
            # letter stays, and its history must say it was parked.
            self._letters_to_explain[saga_id] = letters
        if order.doomed == "declined" and ("process-payment", "execute") in applied:
            report.double.append(f"{saga_id}: a declined card was charged")
        if order.doomed == "unknown_sku" and ("reserve-inventory", "execute") in applied:
            report.double.append(f"{saga_id}: an unknown SKU was reserved")
        if (
            order.doomed == "unrefundable"
            and ("process-payment", "execute") in applied
            and status != SagaStatus.FAILED.value
        ):
            report.lost.append(f"{saga_id}: an unrefundable charge, yet the saga is {status}")
        if order.doomed == "unserved" and ("create-shipment", "execute") in applied:
            report.double.append(f"{saga_id}: an unserved region was shipped to")

    async def explain_letters(self) -> None:
        """Dead letters of sagas not failed now: their history must show a parking."""
        for saga_id, letters in self._letters_to_explain.items():
            history = await self.store.history(saga_id)
            if not any(entry.to_status is SagaStatus.FAILED for entry in history):
                self.report.stuck.append(f"{saga_id}: dead-lettered {letters} but never parked")


async def run_chaos(
    config: ChaosConfig,
    *,
    postgres_url: str,
    amqp_url: str,
    directory: Path,
    out: Callable[[str], None] = emit,
) -> Report:
    """Run the whole scenario once; always cleans up. Prints the summary line."""
    began = time.monotonic()
    run = Run(config, postgres_url, amqp_url, directory)
    run.out = out
    out(
        f"faults: seed={config.seed} sagas={config.sagas} seconds={config.seconds} "
        f"max_per_kind={config.max_per_kind} prefix={run.prefix} tables={run.table_prefix}* "
        f"logs={directory}"
    )
    try:
        await run.setup()
        await run.chaos()
        await run.settle()
        counts, letters = await run.drain()
        await run.check(counts, letters)
        await run.explain_letters()
    except BaseException as exc:
        run.report.notes.append(f"the run was aborted: {exc!r}")
        out(run.report.details())
        raise
    finally:
        await run.cleanup()
        run.report.elapsed = time.monotonic() - began
        out(run.report.summary())
    return run.report
