"""The order sample end to end over the real services.

Inventory, payments and shipping each run in a process of their own
(``python -m sagas_rabbitmq.host samples.order_processing.services:<name>``); the orchestrator
runs in the test process, with the saga state in PostgreSQL. Each participant process appends
its effects to a ledger file (``SAMPLE_LEDGER_FILE``), which is how the tests see that nothing
was applied twice and everything undone had been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO

import aio_pika
import pytest

from sagas_abstractions import SagaInstance, SagaStatus
from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import (
    list_consumers,
    list_queues,
    rabbitmqctl_available,
    sweep,
    unique_prefix,
)
from sagas_sqlalchemy import SqlSagaStore, create_store
from samples.order_processing.demo import Scenario, scenarios
from samples.order_processing.messages import OrderData
from samples.order_processing.saga import build_order_saga
from samples.order_processing.services import (
    LEDGER_FILE_ENV,
    PAYMENT_LATENCY_ENV,
    Effect,
    Ledger,
)

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("inventory", "payments", "shipping")
UNDO = {"reserve": "release", "charge": "refund", "ship": "cancel"}
"""Each forward effect and the effect that undoes it."""
DELIVERY_LIMIT = 5
READY_WITHIN = 20.0
STOP_WITHIN = 15.0
SETTLE_WITHIN = 40.0


class ParticipantProcesses:
    """The sample's participant processes of one test, one per service.

    Each process's stdout says ``ready``; its log (stderr) goes to a file next to its ledger.
    """

    def __init__(self, amqp_url: str, prefix: str, directory: Path) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.directory = directory
        self.running: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list[IO[bytes]] = []

    def ledger_file(self, service: str) -> Path:
        """Where the ``service`` process writes its effects."""
        return self.directory / f"{service}.ledger.jsonl"

    def log(self, service: str) -> str:
        """The end of the ``service`` process's log."""
        path = self.directory / f"{service}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.exists() else ""

    def effects(self) -> list[Effect]:
        """Every effect every process applied, service by service, each in its order."""
        return [
            effect
            for service in SERVICES
            if self.ledger_file(service).exists()
            for effect in Ledger.open(self.ledger_file(service)).entries
        ]

    async def start(self, service: str, **env: str) -> None:
        """Start the ``service`` process and wait until it consumes its commands."""
        log = (self.directory / f"{service}.log").open("ab")
        self._logs.append(log)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sagas_rabbitmq.host",
            f"samples.order_processing.services:{service}",
            "--url",
            self.amqp_url,
            "--prefix",
            self.prefix,
            "--delivery-limit",
            str(DELIVERY_LIMIT),
            "--group",
            "participants",
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                LEDGER_FILE_ENV: str(self.ledger_file(service)),
                **env,
            },
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        self.running[service] = process
        assert process.stdout is not None
        async with asyncio.timeout(READY_WITHIN):
            line = await process.stdout.readline()
        assert line == b"ready\n", f"{service} did not start:\n{self.log(service)}"

    async def kill(self, service: str) -> None:
        """SIGKILL the ``service`` process: no clean-up, messages in flight unacknowledged."""
        process = self.running.pop(service)
        process.kill()
        async with asyncio.timeout(STOP_WITHIN):
            await process.wait()

    async def terminate(self) -> dict[str, int | None]:
        """SIGTERM every process; returns their exit statuses."""
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        statuses: dict[str, int | None] = {}
        for service, process in self.running.items():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WITHIN):
                    await process.wait()
            statuses[service] = process.returncode
        return statuses

    async def close(self) -> None:
        """Kill whatever still runs (a failed test) and close the log files."""
        for process in self.running.values():
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_WITHIN):
                        await process.wait()
        self.running.clear()
        for log in self._logs:
            log.close()


@pytest.fixture
async def prefix(amqp_url: str) -> AsyncIterator[str]:
    """A RabbitMQ name prefix of this test; everything under it is deleted afterwards."""
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on PATH")
    name = unique_prefix("sagas-e2e")
    yield name
    await sweep(amqp_url, f"{name}.")


@pytest.fixture
async def processes(
    amqp_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[ParticipantProcesses]:
    """The test's participant processes; any still running at the end are killed."""
    hosted = ParticipantProcesses(amqp_url, prefix, tmp_path)
    try:
        yield hosted
    finally:
        await hosted.close()


@pytest.fixture
async def bus(amqp_url: str, prefix: str) -> AsyncIterator[RabbitBus]:
    """The orchestrator's bus."""
    connected = await RabbitBus.connect(
        amqp_url,
        prefix=prefix,
        delivery_limit=DELIVERY_LIMIT,
        group="orchestrator",
        publish_timeout=3.0,
        close_timeout=3.0,
        reconnect_interval=0.3,
    )
    try:
        yield connected
    finally:
        await connected.close()


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    """A saga store on PostgreSQL with tables of this test only, dropped afterwards."""
    created = create_store(
        postgres_url, table_prefix=f"e2e_{uuid.uuid4().hex[:8]}_", create_tables=True
    )
    try:
        await created.initialize()
        yield created
    finally:
        await created.drop_tables()
        await created.close()


async def run_orders(
    bus: RabbitBus,
    store: SqlSagaStore,
    processes: ParticipantProcesses,
    orders: Sequence[OrderData],
    *,
    meanwhile: Callable[[], Awaitable[None]] | None = None,
) -> tuple[dict[str, SagaStatus], dict[str, int | None]]:
    """Run a saga per order, doing ``meanwhile`` while they run, then stop everything.

    The participant processes get SIGTERM once every saga has ended; the orchestrator keeps
    consuming until their last replies (stale ones included) are in, then stops.

    Returns:
        How each order ended, and the participant processes' exit statuses.
    """
    async with SagaRuntime(sagas=[E2E_SAGA], bus=bus, store=store, group="e2e") as runtime:
        started = [
            await runtime.start_saga(E2E_SAGA, order, correlation_id=order.order_id)
            for order in orders
        ]
        if meanwhile is not None:
            await meanwhile()
        finished: list[SagaInstance] = await asyncio.gather(
            *(runtime.wait_for(saga.saga_id, timeout=SETTLE_WITHIN) for saga in started)
        )
        statuses = await processes.terminate()
        async with asyncio.timeout(15):
            while await messages_left(bus.settings.url, bus.settings.prefix):
                await asyncio.sleep(0.1)
    await bus.close()
    ended = {order.order_id: saga.status for order, saga in zip(orders, finished, strict=True)}
    return ended, statuses


def effect_problems(ended: dict[str, SagaStatus], effects: Sequence[Effect]) -> list[str]:
    """What breaks the sample's promise about effects, order by order (empty when none does).

    A completed order has each forward effect exactly once and nothing undone; a compensated
    order has every forward effect it got undone exactly once, and nothing undone that was not
    applied. No command applies an effect twice.
    """
    problems = [
        f"{service}.{action} applied {count} times by command {key}"
        for (service, action, key), count in Counter(
            (e.service, e.action, e.key) for e in effects
        ).items()
        if count > 1
    ]
    for order_id, status in ended.items():
        mine = [e for e in effects if e.order_id == order_id]
        for forward, undo in UNDO.items():
            done = [(e.ref, e.amount) for e in mine if e.action == forward]
            undone = [(e.ref, e.amount) for e in mine if e.action == undo]
            if status is SagaStatus.COMPLETED and (len(done) != 1 or undone):
                problems.append(f"{order_id} completed with {forward}={done} {undo}={undone}")
            if status is SagaStatus.COMPENSATED and (len(done) > 1 or undone != done):
                problems.append(f"{order_id} compensated with {forward}={done} {undo}={undone}")
    return problems


async def messages_left(amqp_url: str, prefix: str) -> dict[str, int]:
    """``{queue: ready messages}`` for the run's queues that hold any.

    The queue's own count (a passive declare) is current, unlike ``rabbitmqctl``'s (refreshed
    every few seconds for quorum queues), but leaves out messages a consumer holds: once
    nothing consumes any more, it is every message the queue holds.
    """
    names = await asyncio.to_thread(list_queues, f"{prefix}.")
    assert names, "the run declared no queue?"
    left = {}
    connection = await aio_pika.connect(amqp_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        for name in names:
            declared = await channel.declare_queue(name, passive=True)
            count = declared.declaration_result.message_count or 0
            if count:
                left[name] = count
    return left


async def assert_nothing_left(amqp_url: str, prefix: str) -> None:
    """No consumer of the run is left, and none of its queues holds a message."""
    async with asyncio.timeout(15):
        while await asyncio.to_thread(list_consumers, f"{prefix}."):
            await asyncio.sleep(0.2)
    assert await messages_left(amqp_url, prefix) == {}


# A happy shipment must never time out, however loaded the machine: with four processes and a
# killed one starting again on two cores, 1 s an attempt was not enough (a shipped order was
# compensated under CPU load). Two attempts of 10 s stay well inside SETTLE_WITHIN, so no outcome
# here depends on the machine's speed; the slow-lane carrier (5 s) then answers in time.
E2E_SAGA = build_order_saga(shipment_timeout=10.0)

# The slow-shipping order is compensated when its last attempt's timeout fires before the late
# reply arrives, and completed when the reply wins; both are correct, and the ledger check below
# holds either way. With the e2e saga's shipment timeout (below) the reply wins.
TIMING_DEPENDENT = {"shipping too slow (timeout)": {SagaStatus.COMPLETED}}


def acceptable(scenario: Scenario) -> set[SagaStatus]:
    """The statuses this scenario may end in."""
    return {scenario.expected, *TIMING_DEPENDENT.get(scenario.name, set())}


def unexpected(
    ended: dict[str, SagaStatus], allowed: dict[str, set[SagaStatus]]
) -> dict[str, SagaStatus]:
    """The orders that ended outside what their scenario allows."""
    return {order: status for order, status in ended.items() if status not in allowed[order]}


def copies(count: int) -> tuple[list[OrderData], dict[str, set[SagaStatus]]]:
    """``count`` copies of the demo batch under distinct order ids, and how each may end."""
    orders, expected = [], {}
    for n in range(1, count + 1):
        for scenario in scenarios():
            order = scenario.order.model_copy(update={"order_id": f"{scenario.order.order_id}-{n}"})
            orders.append(order)
            expected[order.order_id] = acceptable(scenario)
    return orders, expected


async def test_every_demo_order_ends_as_expected_with_each_participant_in_a_process_of_its_own(
    processes: ParticipantProcesses,
    bus: RabbitBus,
    store: SqlSagaStore,
    amqp_url: str,
    prefix: str,
) -> None:
    for service in SERVICES:
        await processes.start(service)
    batch = scenarios()

    ended, statuses = await run_orders(bus, store, processes, [s.order for s in batch])

    assert statuses == dict.fromkeys(SERVICES, 0), [processes.log(s) for s in SERVICES]
    allowed = {scenario.order.order_id: acceptable(scenario) for scenario in batch}
    assert set(ended) == set(allowed)
    assert unexpected(ended, allowed) == {}
    effects = processes.effects()
    assert effect_problems(ended, effects) == []
    assert {e.service for e in effects} == set(SERVICES)  # every process did real work
    await assert_nothing_left(amqp_url, prefix)


async def test_orders_in_flight_end_as_expected_without_double_charges_when_payments_is_killed(
    processes: ParticipantProcesses,
    bus: RabbitBus,
    store: SqlSagaStore,
    amqp_url: str,
    prefix: str,
) -> None:
    # The gateway answers 0.3 s after capturing a charge: a SIGKILL then leaves charges applied
    # and unanswered, whose commands the broker redelivers to the next payments process.
    slow_gateway = {PAYMENT_LATENCY_ENV: "0.3"}
    for service in SERVICES:
        await processes.start(service, **(slow_gateway if service == "payments" else {}))
    orders, expected = copies(4)
    ledger = processes.ledger_file("payments")
    charged_at_kill: list[int] = []

    async def kill_and_restart_payments() -> None:
        async with asyncio.timeout(20):
            while not ledger.exists() or len(Ledger.open(ledger).entries) < 3:
                await asyncio.sleep(0.02)
        await processes.kill("payments")
        charged_at_kill.append(sum(e.action == "charge" for e in Ledger.open(ledger).entries))
        await processes.start("payments", **slow_gateway)

    ended, statuses = await run_orders(
        bus, store, processes, orders, meanwhile=kill_and_restart_payments
    )

    assert statuses == dict.fromkeys(SERVICES, 0), [processes.log(s) for s in SERVICES]
    assert set(ended) == set(expected)
    assert unexpected(ended, expected) == {}
    effects = processes.effects()
    charges = sum(e.action == "charge" for e in effects)
    assert charged_at_kill[0] < charges  # the kill hit payments with charges still to make
    assert effect_problems(ended, effects) == []
    await assert_nothing_left(amqp_url, prefix)
