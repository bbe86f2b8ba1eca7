"""Soak: the fault suite's chaos scenario, longer and bigger than CI runs it.

```console
$ python -m bench.soak --seconds 300 --sagas 1000 --seed 7
$ python bench/soak.py --seconds 120 --sagas 400 --faults-per-kind 10
```

The services come from ``SAGAS_TEST_DATABASE_URL`` / ``SAGAS_TEST_AMQP_URL``, else the local
ones on loopback. Prints the same summary line as ``tests/faults`` and exits 1 when anything was
lost, applied twice or left stuck (the details name the seed to rerun with).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/soak.py` as well as `python -m bench.soak`
    sys.path.insert(0, str(ROOT))

from tests.conftest import LOCAL_AMQP_URL, LOCAL_POSTGRES_URL  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="chaos window (bound)")
    parser.add_argument("--sagas", type=int, default=400, help="sagas started in the window")
    parser.add_argument("--seed", type=int, default=None, help="default: SAGAS_FAULT_SEED or fixed")
    parser.add_argument("--faults-per-kind", type=int, default=None, help="default: seconds / 10")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to settle (bound)")
    parser.add_argument("--logs", type=Path, default=None, help="keep process logs here")
    parser.add_argument("--verbose", action="store_true", help="print the fault timeline")
    parser.add_argument(
        "--step-timeout", type=float, default=None, help="per-attempt step timeout (default 1.5)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one soak; returns the exit status."""
    options = _parser().parse_args(argv)
    if options.step_timeout is not None:  # read when the saga definition is imported, below
        os.environ["FAULTS_STEP_TIMEOUT"] = str(options.step_timeout)
    from tests.faults.chaos import (  # noqa: PLC0415 - after the step timeout is set
        ChaosConfig,
        emit,
        run_chaos,
        seed_from_env,
    )

    config = ChaosConfig(
        seed=options.seed if options.seed is not None else seed_from_env(),
        sagas=options.sagas,
        seconds=options.seconds,
        max_per_kind=options.faults_per_kind or max(2, int(options.seconds // 10)),
        workers=options.workers,
        settle_within=options.settle,
    )
    postgres_url = os.environ.get("SAGAS_TEST_DATABASE_URL") or LOCAL_POSTGRES_URL
    amqp_url = os.environ.get("SAGAS_TEST_AMQP_URL") or LOCAL_AMQP_URL
    with tempfile.TemporaryDirectory(prefix="sagas-soak-") as scratch:
        directory = options.logs or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(
            run_chaos(config, postgres_url=postgres_url, amqp_url=amqp_url, directory=directory)
        )
    if options.verbose or not report.ok:
        emit(report.details(limit=200))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
