"""`sagas worker` as a real process: graceful SIGTERM loses nothing; bad settings fail clearly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagas_abstractions import SagaStatus
from sagas_core import Orchestrator, SystemClock
from sagas_sqlalchemy import SqlSagaStore
from samples.order_processing.demo import Scenario, scenarios
from samples.order_processing.saga import order_saga

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[3]
HOST = "samples.order_processing.host:host"
# Scenarios whose outcome does not depend on how much stock earlier orders used up.
# (The flaky gateway fails once per process, so a restart can legitimately use up its retries.)
STABLE = {"happy path", "unknown SKU", "card declined", "region not served"}


def _worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes a test starts; any still running at the end (a failed test) is killed."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def _start_worker(
    env: dict[str, str], log: Path, spawned: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    with log.open("a") as stderr:  # a file, not a pipe: a chatty worker must never block on it
        process = subprocess.Popen(
            [sys.executable, "-m", "sagas_core.cli", "worker", HOST, "--graceful-timeout", "20"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    spawned.append(process)
    assert process.stdout is not None
    line = process.stdout.readline()  # "ready", or "" if it died
    if line.strip() != "ready":
        process.kill()
        process.communicate(timeout=10)
        pytest.fail(f"worker did not become ready: {line!r}\n{log.read_text()}")
    return process


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    return process.returncode


@pytest.fixture
def table_prefix(postgres_url: str) -> Iterator[str]:
    prefix = f"w{uuid.uuid4().hex[:8]}_"
    yield prefix

    async def drop() -> None:
        store = SqlSagaStore.from_url(postgres_url, table_prefix=prefix)
        try:
            await store.drop_tables()
        finally:
            await store.close()

    asyncio.run(drop())


def test_sigterm_mid_load_loses_no_saga_and_a_restarted_worker_finishes_them(
    postgres_url: str,
    table_prefix: str,
    tmp_path: Path,
    spawned: list[subprocess.Popen[str]],
) -> None:
    log = tmp_path / "worker.log"
    env = _worker_env(
        SAGAS_DATABASE_URL=postgres_url,
        SAGAS_TABLE_PREFIX=table_prefix,
        SAGAS_AUTO_MIGRATE="1",
        SAGAS_LOG_LEVEL="WARNING",
        # The restarted worker resumes a burst of sagas at once: the demo's 1 s per shipment
        # attempt would time happy orders out behind it.
        SAMPLE_SHIPMENT_TIMEOUT="3",
        # Each charge takes 0.2 s, so the load lasts well past the first completed saga however
        # fast the worker is: the SIGTERM below lands mid-load.
        SAMPLE_PAYMENT_LATENCY="0.2",
    )
    # Big enough that the worker (hundreds of steps a second) is still busy when SIGTERM comes.
    batch: list[Scenario] = [s for s in scenarios() if s.name in STABLE] * 25
    worker = _start_worker(env, log, spawned)

    async def load_then_stop() -> dict[str, Scenario]:
        store = SqlSagaStore.from_url(postgres_url, table_prefix=table_prefix)
        orchestrator = Orchestrator(store=store, definitions=[order_saga], clock=SystemClock())
        try:
            started = {}
            for scenario in batch:
                saga = await orchestrator.start(order_saga, scenario.order)
                started[saga.saga_id] = scenario
            # Let part of the load finish, then stop the worker in the middle of the rest.
            async with asyncio.timeout(30):
                while not await orchestrator.list(status=SagaStatus.COMPLETED, limit=1):
                    await asyncio.sleep(0.05)
            return started
        finally:
            await store.close()

    started = asyncio.run(load_then_stop())
    assert _stop(worker) == 0

    async def active_count() -> int:
        store = SqlSagaStore.from_url(postgres_url, table_prefix=table_prefix)
        try:
            running = await store.find(status=SagaStatus.RUNNING, limit=1000)
            compensating = await store.find(status=SagaStatus.COMPENSATING, limit=1000)
            return len(running) + len(compensating)
        finally:
            await store.close()

    interrupted = asyncio.run(active_count())
    worker = _start_worker(env, log, spawned)
    try:

        async def settle() -> dict[str, SagaStatus]:
            store = SqlSagaStore.from_url(postgres_url, table_prefix=table_prefix)
            orchestrator = Orchestrator(store=store, definitions=[order_saga], clock=SystemClock())
            try:
                return {
                    saga_id: (await orchestrator.wait_for(saga_id, timeout=60)).status
                    for saga_id in started
                }
            finally:
                await store.close()

        final = asyncio.run(settle())
    finally:
        assert _stop(worker) == 0
    wrong = {
        saga_id: (started[saga_id].name, status.value)
        for saga_id, status in final.items()
        if status is not started[saga_id].expected
    }
    assert not wrong, f"{len(wrong)} sagas ended unexpectedly ({interrupted} were interrupted)"
    assert interrupted > 0  # the stop really came mid-load


def test_a_bad_setting_exits_non_zero_naming_the_variable_without_leaking_the_password() -> None:
    env = _worker_env(
        SAGAS_CONCURRENCY="lots",
        SAGAS_DATABASE_URL="postgresql+psycopg://app:hunter2@127.0.0.1:5432/app",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sagas_core.cli", "worker", HOST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "SAGAS_CONCURRENCY" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_an_unreachable_database_is_fatal_at_start(tmp_path: Path) -> None:
    env = _worker_env(
        SAGAS_DATABASE_URL="postgresql+psycopg://app:hunter2@127.0.0.1:1/app",
        SAGAS_AUTO_MIGRATE="1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sagas_core.cli", "worker", HOST],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "could not start" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
