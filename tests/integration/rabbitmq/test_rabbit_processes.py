"""Participants in a process of their own (``python -m sagas_rabbitmq.host``), end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from tests.integration.rabbitmq.rabbit_travel import (
    COMPENSATED_EFFECTS,
    COMPLETED_EFFECTS,
    EXPECTED_STATUS,
    TripData,
    read_ledger,
    trip_saga,
)

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]
ROOT = Path(__file__).resolve().parents[3]


async def test_participants_in_a_separate_process_serve_sagas_and_stop_cleanly_on_sigterm(
    connect: BusFactory, amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    orchestrator_bus = await connect(group="orchestrator")
    ledger_path = tmp_path / "ledger.tsv"
    ledger_path.touch()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagas_rabbitmq.host",
        "tests.integration.rabbitmq.rabbit_travel:hosted",
        "--url",
        amqp_url,
        "--prefix",
        prefix,
        "--delivery-limit",
        "2",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SAGAS_TEST_LEDGER": str(ledger_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            assert await process.stdout.readline() == b"ready\n"
        trips = {f"t-{n}": n % 3 == 0 for n in range(12)}

        async with SagaRuntime(sagas=[trip_saga()], bus=orchestrator_bus, group="procs") as runtime:
            started = [
                await runtime.start_saga("trip-booking", TripData(trip_id=trip, fail_car=fail))
                for trip, fail in trips.items()
            ]
            finished = await asyncio.gather(
                *(runtime.wait_for(saga.saga_id, timeout=20) for saga in started)
            )

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    ledger = read_ledger(str(ledger_path))
    for saga, (trip, fail) in zip(finished, trips.items(), strict=True):
        assert saga.status is EXPECTED_STATUS[fail], trip
        assert ledger.of(trip) == (COMPENSATED_EFFECTS if fail else COMPLETED_EFFECTS), trip
    assert ledger.applied_twice() == []
