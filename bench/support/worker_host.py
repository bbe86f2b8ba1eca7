"""The second orchestrator process of ``bench/throughput.py --workers 2``.

Run by the bench as ``python -m sagas_core.cli worker bench.support.worker_host:host`` with
``SAGAS_DATABASE_URL``, ``SAGAS_TABLE_PREFIX``, ``SAGAS_AMQP_URL`` and ``SAGAS_RABBITMQ_PREFIX``
set. On shutdown it writes its orchestrator's counters as JSON to ``BENCH_STATS_FILE``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.support.remote import bench_saga
from sagas_core import SagaHost
from sagas_core.settings import load_settings


class BenchHost(SagaHost):
    """A host that reports its conflict count when it stops."""

    async def stop(self, *, grace: float | None = None) -> None:
        target = os.environ.get("BENCH_STATS_FILE")
        if target and self.started:
            orchestrator = self.runtime.orchestrator
            stats = {
                "conflicts": orchestrator.conflicts,
                "stale_cache": orchestrator.stale_cache,
                "published": self.runtime.relay.published,
            }
            Path(target).write_text(json.dumps(stats), encoding="utf-8")  # noqa: ASYNC240
        await super().stop(grace=grace)


def host() -> SagaHost:
    """The worker's host: the bench saga, settings from ``SAGAS_*``."""
    return BenchHost(settings=load_settings(), sagas=(bench_saga,))
