"""The hand-written baseline of issue 10: the same durable 3-step saga, no framework.

aio-pika and psycopg 3 (async), asyncio. Per step, the orchestrator commits one conditional
``UPDATE ... WHERE version`` plus one history insert in their own transaction, then publishes
the next command persistent with a publisher confirm, then acks the reply. The participants
(one separate process, ``--serve``) consume three durable quorum queues and answer with a
persistent, confirmed reply on the orchestrator's durable quorum reply queue. Step latency is
measured like ``bench/throughput.py``: from the command's publish call to the commit of its
reply's transition.

Usage: ``python -m bench.raw_baseline [--levels 1,8,64] [--sagas 300] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Self

import aio_pika
import psycopg

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

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from aio_pika.abc import AbstractIncomingMessage, FieldValue
    from psycopg.rows import TupleRow

STEPS = ("reserve", "pay", "ship")
QUORUM: dict[str, FieldValue] = {"x-queue-type": "quorum"}
POOL_SIZE = 16


def queue_name(prefix: str, what: str) -> str:
    return f"{prefix}.{what}"


# ---------------------------------------------------------------------- participants


def queue_args(classic: bool) -> dict[str, FieldValue]:  # noqa: FBT001
    """Quorum queues, like ours by default; ``--classic`` for classic durable queues."""
    return {} if classic else QUORUM


async def serve(url: str, prefix: str, *, classic: bool) -> None:
    """Answer every command with a persistent, confirmed reply, then ack it."""
    connection = await aio_pika.connect(url)
    async with connection:
        publish = await connection.channel(publisher_confirms=True)
        for step in STEPS:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=64)
            queue = await channel.declare_queue(
                queue_name(prefix, step), durable=True, arguments=queue_args(classic)
            )

            async def answer(message: AbstractIncomingMessage) -> None:
                command = json.loads(message.body)
                reply = {"status": "succeeded", "data": {"id": f"x-{command['saga_id']}"}}
                await publish.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps({**command, **reply}).encode(),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        correlation_id=message.correlation_id,
                        message_id=f"{message.message_id}:reply",
                        content_type="application/json",
                    ),
                    routing_key=message.reply_to or "",
                )
                await message.ack()

            await queue.consume(answer)
        print("ready", flush=True)
        await asyncio.Event().wait()


# ---------------------------------------------------------------------- orchestrator


class Pool:
    """A fixed set of connections, borrowed one at a time."""

    def __init__(self, connections: list[psycopg.AsyncConnection[TupleRow]]) -> None:
        self.free: asyncio.Queue[psycopg.AsyncConnection[TupleRow]] = asyncio.Queue()
        for connection in connections:
            self.free.put_nowait(connection)
        self.all = connections

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        connection = await self.free.get()
        try:
            async with connection.transaction():
                yield connection
        finally:
            self.free.put_nowait(connection)


class Raw:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"raw-{uuid.uuid4().hex[:8]}"
        self.tables = f"raw_{uuid.uuid4().hex[:8]}"
        self.published: dict[tuple[str, int], float] = {}
        self.done: dict[str, asyncio.Future[None]] = {}
        self.step_ms: list[float] = []

    async def publish_command(self, saga_id: str, step: int, version: int) -> None:
        body = json.dumps({"saga_id": saga_id, "step": step, "version": version}).encode()
        self.published[(saga_id, step)] = time.perf_counter()
        await self.exchange.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=saga_id,
                message_id=f"{saga_id}:{step}",
                reply_to=queue_name(self.prefix, "replies"),
                content_type="application/json",
            ),
            routing_key=queue_name(self.prefix, STEPS[step]),
        )

    async def start_saga(self, saga_id: str) -> None:
        async with self.pool.transaction() as db:
            await db.execute(
                f"INSERT INTO {self.tables}_saga (id, step, status, data, version) "  # noqa: S608
                "VALUES (%s, 0, 'running', %s, 1)",
                (saga_id, json.dumps({"order_id": saga_id})),
            )
            await db.execute(
                f"INSERT INTO {self.tables}_history (saga_id, version, step, at) "  # noqa: S608
                "VALUES (%s, 1, 0, now())",
                (saga_id,),
            )
        await self.publish_command(saga_id, 0, 1)

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = json.loads(message.body)
        saga_id, step, version = reply["saga_id"], reply["step"], reply["version"]
        last = step == len(STEPS) - 1
        async with self.pool.transaction() as db:
            cursor = await db.execute(
                f"UPDATE {self.tables}_saga SET step = %s, status = %s, "  # noqa: S608
                "data = data || %s::jsonb, version = version + 1 WHERE id = %s AND version = %s",
                (
                    step + 1,
                    "completed" if last else "running",
                    json.dumps({STEPS[step]: reply["data"]["id"]}),
                    saga_id,
                    version,
                ),
            )
            if cursor.rowcount == 1:
                await db.execute(
                    f"INSERT INTO {self.tables}_history (saga_id, version, step, at) "  # noqa: S608
                    "VALUES (%s, %s, %s, now())",
                    (saga_id, version + 1, step + 1),
                )
        now = time.perf_counter()
        sent = self.published.pop((saga_id, step), None)
        if sent is not None:
            self.step_ms.append((now - sent) * 1000)
        if cursor.rowcount == 1:
            if last:
                future = self.done.get(saga_id)
                if future is not None and not future.done():
                    future.set_result(None)
            else:
                await self.publish_command(saga_id, step + 1, version + 1)
        await message.ack()

    async def __aenter__(self) -> Self:
        self.cleanup = contextlib.AsyncExitStack()
        try:
            await self._open()
        except BaseException:
            await self.cleanup.aclose()
            raise
        return self

    async def _open(self) -> None:
        connections: list[psycopg.AsyncConnection[TupleRow]] = []
        self.cleanup.push_async_callback(self._close_database, connections)
        for _ in range(POOL_SIZE):  # one by one: close what connected if a later one fails
            connection = await psycopg.AsyncConnection.connect(self.args.database_url)
            connections.append(connection)
        self.pool = Pool(connections)
        self.cleanup.push_async_callback(self._drop_tables)
        async with self.pool.transaction() as db:
            await db.execute(
                f"CREATE TABLE {self.tables}_saga (id text PRIMARY KEY, step int NOT NULL, "
                "status text NOT NULL, data jsonb NOT NULL, version int NOT NULL)"
            )
            await db.execute(
                f"CREATE TABLE {self.tables}_history (id bigserial PRIMARY KEY, "
                "saga_id text NOT NULL, version int NOT NULL, step int NOT NULL, "
                "at timestamptz NOT NULL)"
            )
        self.participants = await Child.start(
            "raw-participants",
            "bench.raw_baseline",
            "--serve",
            "--prefix",
            self.prefix,
            *(["--classic"] if self.args.classic else []),
            "--amqp-url",
            self.args.amqp_url,
        )
        self.cleanup.push_async_callback(self.participants.stop)
        self.connection = await aio_pika.connect(self.args.amqp_url)
        self.cleanup.push_async_callback(self._close_broker)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = self.channel.default_exchange

    async def __aexit__(self, *_: object) -> None:
        await self.cleanup.aclose()

    async def _close_broker(self) -> None:
        # Participants first: a consumer still running would declare its queue again.
        await self.participants.stop()
        channel = await self.connection.channel()
        for what in (*STEPS, "replies"):
            await channel.queue_delete(queue_name(self.prefix, what))
        await self.connection.close()

    async def _drop_tables(self) -> None:
        async with self.pool.transaction() as db:
            await db.execute(f"DROP TABLE IF EXISTS {self.tables}_saga, {self.tables}_history")

    @staticmethod
    async def _close_database(connections: list[psycopg.AsyncConnection[TupleRow]]) -> None:
        for connection in connections:
            await connection.close()

    async def drive(self, level: int, count: int, saga_ms: list[float]) -> None:
        gate = asyncio.Semaphore(level)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            async with gate:
                saga_id = uuid.uuid4().hex
                future: asyncio.Future[None] = loop.create_future()
                self.done[saga_id] = future
                began = time.perf_counter()
                await self.start_saga(saga_id)
                await asyncio.wait_for(future, 60)
                del self.done[saga_id]
                saga_ms.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(one() for _ in range(count)))

    async def level(self, level: int, count: int) -> Result:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=max(level, 8))
        queue = await channel.declare_queue(
            queue_name(self.prefix, "replies"),
            durable=True,
            arguments=queue_args(self.args.classic),
        )
        tag = await queue.consume(self.on_reply)
        try:
            await self.drive(level, min(count, max(level * 2, 20)), [])  # warm-up
            self.step_ms = []
            pids = {"orch": None, "part": self.participants.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            services_before = services_cpu_seconds()
            saga_ms: list[float] = []
            began = time.perf_counter()
            await self.drive(level, count, saga_ms)
            elapsed = time.perf_counter() - began
            cpu = {name: round(cpu_seconds(pid) - before[name], 3) for name, pid in pids.items()}
            services_after = services_cpu_seconds()
            cpu.update(
                {
                    name: round(services_after[name] - services_before[name], 3)
                    for name in services_after
                }
            )
        finally:
            await queue.cancel(tag)
            await channel.close()
        return Result(
            impl="raw-classic" if self.args.classic else "raw",
            level=level,
            sagas=count,
            seconds=elapsed,
            steps=count * len(STEPS),
            step_ms=self.step_ms,
            saga_ms=saga_ms,
            cpu=cpu,
            rss_mib={name: round(rss_mib(pid)[1], 1) for name, pid in pids.items()},
            load=load_average(),
        )


async def run(args: argparse.Namespace) -> list[Result]:
    results = []
    async with Raw(args) as raw:
        for level in args.levels:
            results.append(await raw.level(level, args.sagas))
            print(f"  measured raw at {level} in flight", file=sys.stderr)
    return results


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--sagas", type=int, default=300)
    parser.add_argument("--database-url", default=DATABASE_URL)
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--classic", action="store_true", help="classic durable queues")
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.amqp_url, args.prefix, classic=args.classic))
        return []
    print(f"machine: {machine()}")
    results = asyncio.run(run(args))
    print(table(results))
    if args.json:
        write_json(args.json, results, bench="raw_baseline")
    return results


if __name__ == "__main__":
    main()
