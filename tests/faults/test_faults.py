"""The order saga under seeded chaos: nothing lost, nothing applied twice, nothing stuck.

Seed: ``SAGAS_FAULT_SEED`` (printed with the summary line; rerun a failure with it).
``bench/soak.py`` runs the same scenario longer and bigger.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sagas_rabbitmq.testing import rabbitmqctl_available
from tests.faults.chaos import ChaosConfig, emit, run_chaos, seed_from_env

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.slow,
]


@pytest.mark.timeout(240)
async def test_the_order_saga_under_chaos_loses_nothing_doubles_nothing_and_leaves_nothing_stuck(
    postgres_url: str, amqp_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on PATH")
    config = ChaosConfig(seed=seed_from_env(), sagas=80, seconds=36.0, max_per_kind=3)

    def out(line: str) -> None:
        with capsys.disabled():  # the summary line shows in the pytest output, captured or not
            emit(line)

    report = await run_chaos(
        config, postgres_url=postgres_url, amqp_url=amqp_url, directory=tmp_path, out=out
    )

    assert sum(report.faults.values()) > 0, report.details()
    assert report.crashed == [], report.details()
    assert (len(report.lost), len(report.double), len(report.stuck)) == (0, 0, 0), (
        f"{report.summary()}\n{report.details()}"
    )
