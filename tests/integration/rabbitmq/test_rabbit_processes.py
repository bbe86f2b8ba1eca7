"""Participants in a process of their own (``python -m sagas_rabbitmq.host``), end to end."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from sagas_rabbitmq.testing import rabbitmqctl, rabbitmqctl_available
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
TARGET = "tests.integration.rabbitmq.rabbit_travel:hosted"


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


@pytest.fixture
def limited_user(prefix: str) -> Iterator[tuple[str, str]]:
    """A broker user (name, password) allowed nothing in the default vhost; deleted after."""
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on PATH")
    name, password = f"{prefix}-user", secrets.token_hex(8)
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", name, "^$", "^$", "^$")
        yield name, password
    finally:
        rabbitmqctl("delete_user", name)


def _run_participant_host(url: str, prefix: str, ledger: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagas_rabbitmq.host", TARGET, "--url", url, "--prefix", prefix],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SAGAS_TEST_LEDGER": str(ledger)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("fault", ["wrong password", "no permission"])
def test_a_participant_process_the_broker_refuses_exits_1_with_one_line(
    amqp_url: str, prefix: str, limited_user: tuple[str, str], fault: str, tmp_path: Path
) -> None:
    name, password = limited_user
    if fault == "wrong password":
        password = "not-" + password
    parts = urlsplit(amqp_url)
    url = urlunsplit(
        parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port or 5672}")
    )

    result = _run_participant_host(url, prefix, tmp_path / "ledger.tsv")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "ACCESS_REFUSED" in errors[0]
    assert password not in result.stderr  # the URL is masked
