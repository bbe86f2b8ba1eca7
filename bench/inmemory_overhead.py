"""Per-step cost of engine + orchestrator on the in-memory store and bus, local no-op steps.

Compared, in the same process, with a plain chain of awaited no-op calls.
Run: .venv/bin/python bench/inmemory_overhead.py [--sagas N] [--steps K]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pydantic import BaseModel

from sagas_core import SagaBuilder, SagaRuntime
from sagas_core.runtime import tune_gc


class Data(BaseModel):
    n: int = 0


async def noop(data: Data) -> None:
    return None


def build(steps: int) -> object:
    builder = SagaBuilder("bench-noop", data=Data)
    for index in range(steps):
        builder.step(f"s{index}").run(noop)
    return builder.build()


async def plain_chain(sagas: int, steps: int) -> float:
    data = Data()
    began = time.perf_counter()
    for _ in range(sagas):
        for _ in range(steps):
            await noop(data)
    return time.perf_counter() - began


async def ours(sagas: int, steps: int, in_flight: int) -> float:
    definition = build(steps)
    async with SagaRuntime(sagas=[definition], concurrency=in_flight) as runtime:  # type: ignore[list-item]
        began = time.perf_counter()
        numbers = iter(range(sagas))

        # ``in_flight`` callers, each starting its next saga when the last one settled. (A task
        # per saga waiting on a semaphore cost the harness itself ~20 us/step at 3,000 sagas.)
        async def caller() -> None:
            for index in numbers:
                saga = await runtime.start_saga("bench-noop", Data(n=index))
                await runtime.wait_for(saga.saga_id, timeout=60)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="worker: the garbage collector tuned as `sagas worker` tunes it (tune_gc); "
        "default: Python's own settings",
    )
    args = parser.parse_args()
    if args.gc == "worker":
        tune_gc()
    plain = asyncio.run(plain_chain(args.sagas, args.steps))
    elapsed = asyncio.run(ours(args.sagas, args.steps, args.in_flight))
    total_steps = args.sagas * args.steps
    print(f"sagas={args.sagas} steps/saga={args.steps} in_flight={args.in_flight} gc={args.gc}")
    print(f"plain awaited chain : {plain / total_steps * 1e6:8.2f} us/step")
    print(
        f"sagas in-memory     : {elapsed / total_steps * 1e6:8.2f} us/step "
        f"({args.sagas / elapsed:,.0f} sagas/s)"
    )


if __name__ == "__main__":
    main()
