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

Levels: ``queues`` is all of the above; ``direct`` calls the participant and the reply handler
instead of queueing (no task switches); ``objects`` also skips JSON. Each prints microseconds per
step next to a plain chain of awaited no-op calls.

``guarantees`` is ``queues`` plus, still hand-written and bare (slotted dataclasses, plain dicts,
no engine, no ports), the work the product promises per step and the issue's target counts in:
the saga's per-step progress and wait in its state; the user's data model validated at each
merge (pydantic, as users declare it); commands and replies as envelopes with the protocol's
message ids, idempotency key and headers; the outbox written in the save and drained right
after it (publish, then mark: inline, no relay task); status events (5 per 3-step saga:
started, a step completed each, completed) through the outbox too; a history row per transition
with its timestamp; the reply deadline the timeout service follows; the participant's inbox of
commands it ran. It answers "what would the cheapest possible implementation of these
guarantees cost in this Python", so the in-memory target can be read against it.

Run: ``python -m bench.inmemory_floor [--sagas N] [--steps K] [--in-flight F]``
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


def check_and_put(
    rows: dict[str, Any], inbox: set[str], new: Any, expected: int | None, message_id: str | None
) -> None:
    """The versioned save's checks (expected version, reply not seen), then the new row."""
    current = rows.get(new.saga_id)
    if (current.version if current is not None else None) != expected:
        raise RuntimeError("version conflict")
    if message_id is not None:
        if message_id in inbox:
            raise RuntimeError("duplicate")
        inbox.add(message_id)
    rows[new.saga_id] = new


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
        check_and_put(self.rows, self.inbox, new, expected, message_id)
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


async def run_callers(
    start: Callable[[str], Awaitable[asyncio.Future[None]]],
    sagas: int,
    in_flight: int,
    background: list[asyncio.Task[None]],
) -> float:
    """``in_flight`` callers, each starting its next saga when its last one ended; seconds."""
    numbers = iter(range(sagas))

    async def caller() -> None:
        for number in numbers:
            await (await start(f"saga-{number}"))

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(in_flight))), timeout=120)
    elapsed = time.perf_counter() - began
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    return elapsed


async def floor(sagas: int, steps: int, in_flight: int, level: str) -> float:
    system = Floor(steps, level)
    consumers = [
        asyncio.create_task(system.consume(system.commands, system.participant)),
        asyncio.create_task(system.consume(system.replies, system.on_reply)),
    ]
    elapsed = await run_callers(system.start, sagas, in_flight, consumers)
    assert len(system.store.history) == sagas * (steps + 1)  # the run was real
    return elapsed


# ---------------------------------------------------------------------- the guarantees, bare


class Data(BaseModel):
    """The user's saga data, as a user declares it (validated at every merge)."""

    n: int = 0


@dataclass(slots=True)
class StepRow:
    """One step's progress, as the saga's state keeps it."""

    name: str
    status: str = "pending"
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None


@dataclass(slots=True)
class Saga:
    """A saga's row, with what the product keeps of it."""

    saga_id: str
    saga_type: str
    status: str
    current: int
    attempt: int
    wait: str | None
    deadline_at: datetime | None
    data: dict[str, Any]
    steps: tuple[StepRow, ...]
    version: int
    updated_at: datetime


@dataclass(slots=True)
class Message:
    """An envelope: route, id, type, correlation, headers and a JSON body."""

    route: str
    key: str
    message_id: str
    message_type: str
    correlation_id: str
    headers: dict[str, str]
    body: bytes
    timestamp: datetime


@dataclass(slots=True)
class GuaranteedStore:
    """Rows, history, the orchestrator's inbox and the outbox, saved together."""

    rows: dict[str, Saga] = field(default_factory=dict)
    history: list[tuple[str, int, datetime, str, str, str, str | None, str | None]] = field(
        default_factory=list
    )
    inbox: set[str] = field(default_factory=set)
    outbox: dict[int, tuple[str, Message]] = field(default_factory=dict)
    next_id: int = 0

    def save(
        self,
        new: Saga,
        expected: int | None,
        message_id: str | None,
        entry: tuple[str, str, str, str | None],
        messages: list[Message],
    ) -> list[int]:
        check_and_put(self.rows, self.inbox, new, expected, message_id)
        from_status, to_status, kind, step = entry
        self.history.append(
            (
                new.saga_id,
                new.version,
                new.updated_at,
                kind,
                from_status,
                to_status,
                step,
                message_id,
            )
        )
        ids = []
        for message in messages:
            self.next_id += 1
            self.outbox[self.next_id] = (new.saga_id, message)
            ids.append(self.next_id)
        return ids


class Guaranteed:
    """The ``guarantees`` level: ``queues`` plus the product's per-step promises, bare."""

    def __init__(self, steps: int) -> None:
        self.names = tuple(f"s{index}" for index in range(steps))
        self.store = GuaranteedStore()
        self.done: dict[str, asyncio.Future[None]] = {}
        self.commands: asyncio.Queue[Message] = asyncio.Queue()
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.events: list[Message] = []  # the event topic: nobody subscribed, kept as a bus would
        self.deadlines: list[tuple[datetime, str, int]] = []
        self.ran: set[str] = set()  # the participant's inbox of commands it ran

    # -- orchestrator side

    def command(self, saga: Saga) -> Message:
        step = self.names[saga.current]
        message_id = f"{saga.saga_id}:{step}:execute:{saga.attempt}"
        key = f"{saga.saga_id}:{step}:execute"
        headers = {
            "x-saga-type": saga.saga_type,
            "x-saga-step": step,
            "x-saga-attempt": str(saga.attempt),
            "x-saga-kind": "execute",
            "x-idempotency-key": key,
        }
        return Message(
            "command",
            "noop",
            message_id,
            "Noop",
            saga.saga_id,
            headers,
            pydantic_core.to_json(saga.data),
            saga.updated_at,
        )

    def event(self, saga: Saga, kind: str, number: int, step: str | None) -> Message:
        event_id = f"{saga.saga_id}:{saga.version}:{number}"
        body = {
            "event_id": event_id,
            "saga_id": saga.saga_id,
            "saga_type": saga.saga_type,
            "kind": kind,
            "status": saga.status,
            "step": step,
            "version": saga.version,
            "at": saga.updated_at,
        }
        return Message(
            "event",
            f"{saga.saga_type}.{kind}",
            event_id,
            "saga.event",
            saga.saga_id,
            {},
            pydantic_core.to_json(body),
            saga.updated_at,
        )

    def sent(
        self,
        saga: Saga,
        messages: list[Message],
        expected: int | None,
        reply_id: str | None,
        entry: tuple[str, str, str, str | None],
    ) -> None:
        ids = self.store.save(saga, expected, reply_id, entry, messages)
        if saga.deadline_at is not None:
            heapq.heappush(self.deadlines, (saga.deadline_at, saga.saga_id, saga.version))
        self.relay(ids)

    async def start(self, saga_id: str) -> asyncio.Future[None]:
        now = datetime.now(UTC)
        data = Data.model_validate({"n": 1}).model_dump(mode="json")
        first, *rest = self.names
        rows = (StepRow(first, "running", 1, now), *(StepRow(name) for name in rest))
        saga = Saga(
            saga_id,
            "bench-noop",
            "running",
            0,
            1,
            "reply",
            now + timedelta(seconds=30),
            data,
            rows,
            1,
            now,
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done[saga_id] = future
        messages = [self.event(saga, "started", 1, None), self.command(saga)]
        self.sent(saga, messages, None, None, ("", "running", "Start", None))
        return future

    async def on_reply(self, message: Message) -> None:
        reply = pydantic_core.from_json(message.body)
        current = self.store.rows[message.correlation_id]
        if message.message_id in self.store.inbox:
            return  # a redelivered reply
        index = current.current
        if reply["step"] != self.names[index] or reply["attempt"] != current.attempt:
            return  # stale
        now = datetime.now(UTC)
        merged = {**current.data, **reply["data"]}
        data = Data.model_validate(merged).model_dump(mode="json")
        rows = list(current.steps)
        done = rows[index]
        rows[index] = StepRow(
            done.name, "succeeded", done.attempt, done.started_at, now, reply["data"]
        )
        step = self.names[index]
        if index + 1 < len(rows):
            rows[index + 1] = StepRow(rows[index + 1].name, "running", 1, now)
            new = Saga(
                current.saga_id,
                current.saga_type,
                "running",
                index + 1,
                1,
                "reply",
                now + timedelta(seconds=30),
                data,
                tuple(rows),
                current.version + 1,
                now,
            )
            messages = [self.event(new, "step_completed", 1, step), self.command(new)]
        else:
            new = Saga(
                current.saga_id,
                current.saga_type,
                "completed",
                index + 1,
                current.attempt,
                None,
                None,
                data,
                tuple(rows),
                current.version + 1,
                now,
            )
            messages = [
                self.event(new, "step_completed", 1, step),
                self.event(new, "completed", 2, None),
            ]
        entry = (current.status, new.status, "StepSucceeded", step)
        self.sent(new, messages, current.version, message.message_id, entry)
        if new.status == "completed":
            self.done.pop(new.saga_id).set_result(None)

    def relay(self, ids: list[int]) -> None:
        """Publish what a save wrote, in order, then mark it sent (inline: no task hop)."""
        for record_id in ids:
            _, message = self.store.outbox[record_id]
            if message.route == "command":
                self.commands.put_nowait(message)
            else:
                self.events.append(message)
            del self.store.outbox[record_id]
        if len(self.events) > 10_000:  # the in-memory bus keeps only its latest messages
            del self.events[:5_000]

    async def timeouts(self) -> None:
        """Follow the reply deadlines; drop the ones a later version made stale."""
        while True:
            await asyncio.sleep(0.05)
            while self.deadlines:
                _, saga_id, version = self.deadlines[0]
                if self.store.rows[saga_id].version == version:
                    break  # still waiting: not due in this bench (30 s)
                heapq.heappop(self.deadlines)

    # -- participant side

    async def participant(self, message: Message) -> None:
        if message.message_id in self.ran:
            return  # redelivered: the participant answers from what it kept (not exercised)
        headers = message.headers
        await typed_noop(Data.model_validate_json(message.body))  # the handler takes typed data
        self.ran.add(message.message_id)
        reply_id = f"{message.message_id}:reply"
        now = datetime.now(UTC)
        body = {
            "message_id": reply_id,
            "saga_id": message.correlation_id,
            "saga_type": headers["x-saga-type"],
            "step": headers["x-saga-step"],
            "attempt": int(headers["x-saga-attempt"]),
            "kind": headers["x-saga-kind"],
            "status": "succeeded",
            "data": {},
            "in_reply_to": message.message_id,
            "created_at": now,
        }
        self.replies.put_nowait(
            Message(
                "reply",
                "replies",
                reply_id,
                "saga.reply",
                message.correlation_id,
                {"x-saga-in-reply-to": message.message_id},
                pydantic_core.to_json(body),
                now,
            )
        )

    async def consume(self, queue: asyncio.Queue[Message], handler: Any) -> None:
        while True:
            await handler(await queue.get())


async def typed_noop(data: Data) -> None:
    return None


async def guarantees(sagas: int, steps: int, in_flight: int) -> float:
    system = Guaranteed(steps)
    background = [
        asyncio.create_task(system.consume(system.commands, system.participant)),
        asyncio.create_task(system.consume(system.replies, system.on_reply)),
        asyncio.create_task(system.timeouts()),
    ]
    elapsed = await run_callers(system.start, sagas, in_flight, background)
    # The run was real: every transition in the history, every saga completed, outbox drained.
    assert len(system.store.history) == sagas * (steps + 1)
    assert all(saga.status == "completed" for saga in system.store.rows.values())
    assert not system.store.outbox
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
    elapsed = asyncio.run(guarantees(args.sagas, args.steps, args.in_flight))
    print(f"floor, guarantees         : {elapsed / total * 1e6:7.2f} us/step")


if __name__ == "__main__":
    main()
