"""Memory soak: a worker's resident memory after 5,000, 10,000, ... sagas.

```console
$ python -m bench.memory                       # checkpoints 5000,10000,50000
$ python -m bench.memory --checkpoints 1000,2000,4000 --in-flight 32
```

The multi-process order saga of the fault suite (one worker, three participant processes with
the transactional idempotency store, PostgreSQL + RabbitMQ on loopback, no faults, no handler
delay). Sagas are started in chunks from this process; after each chunk has ended, the worker's
RSS (``VmRSS`` from ``/proc``) is printed beside the first checkpoint's. A worker that keeps
something per saga grows linearly; one that keeps only bounded caches levels off. Prints one
line per checkpoint and exits 1 when a later checkpoint is more than ``--tolerance`` above the
first. Cleans up its processes, queues and tables, also when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/memory.py` as well as `python -m bench.memory`
    sys.path.insert(0, str(ROOT))

from tests.conftest import LOCAL_AMQP_URL, LOCAL_POSTGRES_URL  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.faults.chaos import Order, Run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--checkpoints",
        default="5000,10000,50000",
        help="comma-separated saga counts at which to read the worker's RSS",
    )
    parser.add_argument("--in-flight", type=int, default=64, help="sagas active at a time")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth")
    parser.add_argument(
        "--chunk-minutes", type=float, default=30.0, help="bound on each chunk (minutes)"
    )
    parser.add_argument(
        "--vacuum-every",
        type=float,
        default=30.0,
        help="seconds between VACUUMs of the run's tables, standing in for autovacuum "
        "(off on the shared test machines); 0: never",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep process logs here")
    return parser


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _vacuum_every(engine: AsyncEngine, prefix: str, seconds: float) -> None:
    """VACUUM the tables named ``prefix*`` every ``seconds``, until cancelled.

    Without it every published outbox record stays a dead row that saves and claims step over
    (1.4 million after 10,000 sagas here): the run slows to a crawl, which says nothing about the
    worker's memory.
    """
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    while True:
        await asyncio.sleep(seconds)
        async with autocommit.connect() as conn:
            names = await conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE starts_with(tablename, :p)"),
                {"p": prefix},
            )
            for name in list(names.scalars()):
                await conn.execute(sa.text(f'VACUUM "{name}"'))


async def _still_active(run: Run, saga_ids: set[str]) -> set[str]:
    """Which of ``saga_ids`` are still running or compensating."""
    from tests.faults.chaos import ACTIVE  # noqa: PLC0415 - after sys.path is set

    table = run.store.tables.instances
    async with run.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(table.c.saga_id).where(
                table.c.saga_id.in_(saga_ids), table.c.status.in_(ACTIVE)
            )
        )
        return set(rows.scalars())


async def _run_window(run: Run, orders: list[Order], *, in_flight: int, deadline: float) -> None:
    """Start ``orders`` keeping ``in_flight`` of them active at a time; wait for them all.

    A bounded window, as a real feed is: starting them all at once would measure the
    high-water mark of thousands of sagas in flight, not what the worker keeps afterwards.
    """
    from tests.faults.app import fault_saga  # noqa: PLC0415 - after sys.path is set

    waiting, active = list(reversed(orders)), set[str]()
    while waiting or active:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(waiting) + len(active)} sagas not done in time")
        while waiting and len(active) < in_flight:
            order = waiting.pop()
            await run.orchestrator.start(fault_saga, order.data, saga_id=order.saga_id)
            active.add(order.saga_id)
        await asyncio.sleep(0.1)
        active = await _still_active(run, active)


async def _soak(options: argparse.Namespace, directory: Path) -> int:
    from tests.faults.chaos import (  # noqa: PLC0415
        ChaosConfig,
        Run,
        emit,
        make_orders,
    )
    from tests.faults.participants import HANDLER_DELAY_ENV  # noqa: PLC0415

    checkpoints = sorted({int(c) for c in options.checkpoints.split(",") if c.strip()})
    if not checkpoints or checkpoints[0] <= 0:
        raise SystemExit("--checkpoints: give positive saga counts, e.g. 5000,10000,50000")
    postgres_url = os.environ.get("SAGAS_TEST_DATABASE_URL") or LOCAL_POSTGRES_URL
    amqp_url = os.environ.get("SAGAS_TEST_AMQP_URL") or LOCAL_AMQP_URL
    run = Run(ChaosConfig(seed=7, sagas=0, workers=1), postgres_url, amqp_url, directory)
    run.processes.participant_env[HANDLER_DELAY_ENV] = "0"
    # The fault suite's small concurrency makes its chaos bite; here it would only slow the feed.
    run.processes.worker_env["SAGAS_CONCURRENCY"] = str(options.in_flight)
    run.processes.participant_concurrency = options.in_flight
    first: float | None = None
    worst = 0.0
    vacuuming: asyncio.Task[None] | None = None
    try:
        await run.setup()
        if options.vacuum_every > 0:
            vacuuming = asyncio.create_task(
                _vacuum_every(run.engine, run.table_prefix, options.vacuum_every)
            )
        await run._untap()  # noqa: SLF001 - the tap's copies would pile up in the broker
        worker = run.processes.running["worker-1"].pid
        emit(f"memory: worker pid {worker}, RSS at start {rss_mib(worker):.1f} MiB")
        done = 0
        began = time.monotonic()
        for checkpoint in checkpoints:
            orders = make_orders(run.rng, f"{run.run_id}-{done}", checkpoint - done)
            deadline = time.monotonic() + options.chunk_minutes * 60
            await _run_window(run, orders, in_flight=options.in_flight, deadline=deadline)
            done = checkpoint
            rss = rss_mib(worker)
            first = rss if first is None else first
            worst = max(worst, rss / first - 1)
            emit(
                f"memory: after {done:>6} sagas RSS {rss:7.1f} MiB "
                f"({(rss / first - 1) * 100:+5.1f}% vs {checkpoints[0]}), "
                f"{done / (time.monotonic() - began):.0f} sagas/s so far"
            )
    finally:
        if vacuuming is not None:
            vacuuming.cancel()
            await asyncio.gather(vacuuming, return_exceptions=True)
        await run.cleanup()
    if worst > options.tolerance:
        emit(f"memory: grew {worst * 100:.1f}%, over the {options.tolerance * 100:.0f}% allowed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the memory soak; returns the exit status."""
    options = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sagas-memory-") as scratch:
        directory = options.logs or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_soak(options, directory))


if __name__ == "__main__":
    sys.exit(main())
