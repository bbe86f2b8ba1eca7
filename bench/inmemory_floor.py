"""The floor under the in-memory overhead: the mechanics a step keeps, hand-written and bare.

``bench/inmemory_overhead.py`` times the real engine + orchestrator on the in-memory store and
bus. This script times what is left when everything but the mechanics those guarantees need is
stripped away, written as plainly as Python allows, so the two numbers say how much of a step is
the library and how much is the design:

* a versioned save (compare the expected version, store the new state, append a history row,
  remember the message id of the reply for deduplication);
* the command and the reply as JSON bodies (encoded by the sender, decoded by the receiver,
  with pydantic-core as the codec does);
* a bus hop each way through an ``asyncio.Queue`` with a consumer task on each side (the
  orchestrator's reply queue and the participant's command queue);
* the caller waiting for the saga's end on a future.

Levels (``--level``): ``queues`` is all of the above; ``direct`` calls the participant and the
reply handler instead of queueing (no task switches); ``objects`` also skips JSON. Each prints
microseconds per step next to a plain chain of awaited no-op calls.

Run: ``python -m bench.inmemory_floor [--sagas N] [--steps K] [--in-flight F]``
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pydantic_core


@dataclass(slots=True)
class State:
    """A saga's row: what the versioned save compares and replaces."""

    saga_id: str
    step: int
    version: int
    data: dict[str, Any]


@dataclass(slots=True)
class Store:
    """Sagas by id, their history, and the reply ids already applied."""

    rows: dict[str, State] = field(default_factory=dict)
    history: list[tuple[str, int, str]] = field(default_factory=list)
    inbox: set[str] = field(default_factory=set)

    def save(self, new: State, expected: int | None, message_id: str | None) -> None:
        current = self.rows.get(new.saga_id)
        if (current.version if current is not None else None) != expected:
            raise RuntimeError("version conflict")
        if message_id is not None:
            if message_id in self.inbox:
                raise RuntimeError("duplicate")
            self.inbox.add(message_id)
        self.rows[new.saga_id] = new
        self.history.append((new.saga_id, new.version, "step"))


class Floor:
    """One orchestrator and one participant in a process, ``steps`` no-op steps per saga."""

    def __init__(self, steps: int, level: str) -> None:
        self.steps = steps
        self.level = level
        self.store = Store()
        self.done: dict[str, asyncio.Future[None]] = {}
        self.commands: asyncio.Queue[Any] = asyncio.Queue()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()

    def encode(self, message: dict[str, Any]) -> Any:
        return message if self.level == "objects" else pydantic_core.to_json(message)

    def decode(self, body: Any) -> dict[str, Any]:
        return body if self.level == "objects" else pydantic_core.from_json(body)  # type: ignore[no-any-return]

    async def send(self, state: State) -> None:
        body = self.encode({"saga_id": state.saga_id, "step": state.step, "data": state.data})
        if self.level == "queues":
            self.commands.put_nowait(body)
        else:
            await self.participant(body)

    async def participant(self, body: Any) -> None:
        command = self.decode(body)
        await noop(command["data"])
        reply = self.encode(
            {
                "saga_id": command["saga_id"],
                "step": command["step"],
                "message_id": f"{command['saga_id']}:{command['step']}",
                "data": {},
            }
        )
        if self.level == "queues":
            self.replies.put_nowait(reply)
        else:
            await self.on_reply(reply)

    async def on_reply(self, body: Any) -> None:
        reply = self.decode(body)
        current = self.store.rows[reply["saga_id"]]
        if reply["step"] != current.step:
            return  # stale
        new = State(current.saga_id, current.step + 1, current.version + 1, current.data)
        self.store.save(new, current.version, reply["message_id"])
        if new.step < self.steps:
            await self.send(new)
        else:
            self.done.pop(new.saga_id).set_result(None)

    async def start(self, saga_id: str) -> asyncio.Future[None]:
        state = State(saga_id, 0, 1, {"n": 1})
        self.store.save(state, None, None)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done[saga_id] = future
        await self.send(state)
        return future

    async def consume(self, queue: asyncio.Queue[Any], handler: Any) -> None:
        while True:
            await handler(await queue.get())


async def noop(data: dict[str, Any]) -> None:
    return None


async def plain_chain(sagas: int, steps: int) -> float:
    began = time.perf_counter()
    for _ in range(sagas * steps):
        await noop({})
    return time.perf_counter() - began


async def floor(sagas: int, steps: int, in_flight: int, level: str) -> float:
    system = Floor(steps, level)
    consumers = [
        asyncio.create_task(system.consume(system.commands, system.participant)),
        asyncio.create_task(system.consume(system.replies, system.on_reply)),
    ]
    numbers = iter(range(sagas))

    async def caller() -> None:
        for number in numbers:
            await (await system.start(f"saga-{number}"))

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(in_flight))), timeout=120)
    elapsed = time.perf_counter() - began
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    assert len(system.store.history) == sagas * (steps + 1)  # the run was real
    return elapsed


def main() -> None:
    """Print microseconds per step for each level of the floor."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    total = args.sagas * args.steps
    plain = asyncio.run(plain_chain(args.sagas, args.steps))
    print(f"sagas={args.sagas} steps/saga={args.steps} in_flight={args.in_flight}")
    print(f"plain awaited chain       : {plain / total * 1e6:7.2f} us/step")
    for level in ("queues", "direct", "objects"):
        elapsed = asyncio.run(floor(args.sagas, args.steps, args.in_flight, level))
        print(f"floor, {level:<19}: {elapsed / total * 1e6:7.2f} us/step")


if __name__ == "__main__":
    main()
