"""A deterministic test harness for your own sagas: stub participants, a fake clock, no tasks.

Example:
    ```python
    async def test_declined_card_releases_the_stock() -> None:
        harness = SagaTestHarness(order_saga)
        harness.stub("inventory").on(ReserveInventory).succeed({"reservation_id": "R-1"})
        harness.stub("inventory").on(ReleaseInventory).succeed()
        harness.stub("payments").on(ProcessPayment).fail("card_declined")

        saga = await harness.start(order)

        assert saga.status is SagaStatus.COMPENSATED
        assert harness.commands(saga.saga_id) == [
            "order-processing.price-order",  # the local step, as <saga>.<step>
            "ReserveInventory", "ProcessPayment", "ReleaseInventory",
        ]
        assert await harness.compensated_steps(saga.saga_id) == ["reserve-inventory"]
    ```

The harness runs the real orchestrator and engine over the in-memory store. Instead of a bus
and background tasks it moves messages itself, one at a time, until nothing is left to do
(:meth:`SagaTestHarness.run_until_idle`); :meth:`SagaTestHarness.advance` moves the fake clock
and fires whatever deadlines passed. Every run is deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ErrorInfo,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaEvent,
    SagaInstance,
    StepKind,
    StepStatus,
)
from sagas_core.builder import local_destination
from sagas_core.codec import dead_lettered, decode_command, decode_event, encode_reply
from sagas_core.di import Dependencies
from sagas_core.events import EventOutcome, event_envelope
from sagas_core.memory.store import InMemorySagaStore
from sagas_core.orchestrator import Orchestrator
from sagas_core.participant import Participant
from sagas_core.testing.clock import FakeClock

if TYPE_CHECKING:
    from datetime import datetime

    from sagas_core.circuit import CircuitBreaker
    from sagas_core.definition import SagaDefinition

__all__ = ["SagaTestHarness", "StubParticipant", "StubScript"]

ReplyFactory = Callable[[CommandMessage], Mapping[str, Any] | BaseModel | None]


@dataclass
class _Answer:
    status: ReplyStatus | None  # None: never answer
    data: ReplyFactory | Mapping[str, Any] | BaseModel | None = None
    error: ErrorInfo | None = None
    delay: timedelta = timedelta()


@dataclass
class StubScript:
    """The scripted answers of one stub for one command type, used in order.

    The last answer repeats once the script runs out. Build it with the chained methods.
    """

    answers: list[_Answer] = field(default_factory=list)
    received: list[CommandMessage] = field(default_factory=list)

    def succeed(
        self,
        data: ReplyFactory | Mapping[str, Any] | BaseModel | None = None,
        *,
        after: timedelta | float = 0,
    ) -> StubScript:
        """Answer success with ``data`` (a mapping, a model, or a function of the command)."""
        self.answers.append(_Answer(ReplyStatus.SUCCEEDED, data, delay=_delay(after)))
        return self

    def fail(
        self,
        code: str = "failed",
        message: str = "",
        *,
        retryable: bool = False,
        times: int = 1,
        after: timedelta | float = 0,
    ) -> StubScript:
        """Answer failure ``times`` times (then the next scripted answer, or this one again)."""
        error = ErrorInfo(code=code, message=message or code, retryable=retryable)
        self.answers.extend(
            _Answer(ReplyStatus.FAILED, error=error, delay=_delay(after)) for _ in range(times)
        )
        return self

    def never_answer(self, *, times: int = 1) -> StubScript:
        """Swallow the command ``times`` times: the step can only time out."""
        self.answers.extend(_Answer(None) for _ in range(times))
        return self

    def then_succeed(
        self, data: ReplyFactory | Mapping[str, Any] | BaseModel | None = None
    ) -> StubScript:
        """Alias of :meth:`succeed`, to read well after :meth:`fail`."""
        return self.succeed(data)

    def _next(self) -> _Answer:
        if not self.answers:
            return _Answer(ReplyStatus.SUCCEEDED)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _delay(after: timedelta | float) -> timedelta:
    return after if isinstance(after, timedelta) else timedelta(seconds=after)


class StubParticipant:
    """A scripted stand-in for a participant destination."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.scripts: dict[str, StubScript] = {}

    def on(self, command: type[BaseModel] | str) -> StubScript:
        """The script for ``command`` (a model class or a command type name)."""
        name = command if isinstance(command, str) else command.__name__
        return self.scripts.setdefault(name, StubScript())


@dataclass(order=True)
class _Delayed:
    due: datetime
    sequence: int
    envelope: Envelope = field(compare=False)


class SagaTestHarness:
    """Drives sagas deterministically against stub (or real) participants.

    Args:
        *definitions: The sagas under test.
        clock: The fake clock (a fresh one by default).
        dependencies: Supplies local step parameters by type.
        strict: Fail on a command for a destination nobody handles (default), instead of
            leaving it unanswered.
        breaker: A circuit breaker for the orchestrator (none by default).
    """

    def __init__(
        self,
        *definitions: SagaDefinition,
        clock: FakeClock | None = None,
        dependencies: Dependencies | None = None,
        strict: bool = True,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        self.store = InMemorySagaStore()
        self.dependencies = dependencies or Dependencies()
        self.strict = strict
        self.orchestrator = Orchestrator(
            store=self.store, definitions=definitions, clock=self.clock, breaker=breaker
        )
        self.stubs: dict[str, StubParticipant] = {}
        self.participants: dict[str, Participant] = {}
        self.sent: list[CommandMessage] = []
        self.events: list[SagaEvent] = []
        self.dead_letters: list[Envelope] = []
        self._delayed: list[_Delayed] = []
        self._sequence = 0
        for definition in definitions:
            if definition.local_steps:
                local = Participant(
                    local_destination(definition.name),
                    dependencies=self.dependencies,
                    clock=self.clock,
                )
                for _, _, spec in definition.local_steps:
                    if spec.handler is not None:
                        local.register(spec.command_type, definition.data_model, spec.handler)
                self.participants[local.destination] = local

    # ------------------------------------------------------------------ arranging

    def stub(self, destination: str) -> StubParticipant:
        """The stub for ``destination`` (created on first use)."""
        return self.stubs.setdefault(destination, StubParticipant(destination))

    def add_participant(self, participant: Participant) -> None:
        """Serve ``participant.destination`` with a real participant instead of a stub."""
        self.participants[participant.destination] = participant

    # ------------------------------------------------------------------ acting

    async def start(
        self,
        data: BaseModel | Mapping[str, Any],
        *,
        saga: str | SagaDefinition | None = None,
        saga_id: str | None = None,
        run: bool = True,
    ) -> SagaInstance:
        """Start a saga and (by default) run until idle; returns the saga as it then stands."""
        name = saga or self._only_saga()
        instance = await self.orchestrator.start(name, data, saga_id=saga_id)
        if run:
            await self.run_until_idle()
        return await self.orchestrator.get(instance.saga_id)

    async def publish(
        self,
        event: BaseModel,
        *,
        message_id: str | None = None,
        topic: str | None = None,
        correlation_id: str | None = None,
        body: bytes | None = None,
        run: bool = True,
    ) -> EventOutcome:
        """Deliver a domain event as the bus would, then (by default) run until idle.

        Publish the same ``message_id`` twice to test a duplicate delivery; an event the
        orchestrator dead-letters lands in :attr:`dead_letters`. ``body`` replaces the event's
        JSON on the wire, to test what a buggy publisher sends.
        """
        self._sequence += 1
        envelope = event_envelope(
            event,
            message_id=message_id or f"event-{self._sequence}",
            topic=topic,
            correlation_id=correlation_id,
            at=self.clock.now(),
        )
        if body is not None:
            envelope = envelope.model_copy(update={"body": body})
        outcome = await self.orchestrator.handle_event(envelope)
        if outcome.dead_letter:
            self.dead_letters.append(dead_lettered(envelope, "; ".join(outcome.dead_letter)))
        if run:
            await self.run_until_idle()
        return outcome

    def _only_saga(self) -> str:
        names = [definition.name for definition in self.orchestrator.registry]
        if len(names) != 1:
            raise ValueError(f"several sagas are registered ({names}): pass saga=...")
        return names[0]

    async def run_until_idle(self, *, max_messages: int = 10_000) -> int:
        """Deliver every pending message (and each reply it causes); returns how many moved."""
        moved = 0
        while moved < max_messages:
            records = await self.store.claim(
                owner="harness", limit=100, lease=timedelta(minutes=5), now=self.clock.now()
            )
            ready = self._due_delayed()
            if not records and not ready:
                return moved
            queue = deque([record.envelope for record in records] + ready)
            await self.store.mark_sent([record.id for record in records], now=self.clock.now())
            while queue:
                moved += 1
                reply = await self._deliver(queue.popleft())
                if reply is not None:
                    await self.orchestrator.handle_envelope(reply)
        raise RuntimeError(f"still busy after {max_messages} messages: is a saga looping?")

    async def advance(self, by: timedelta | float) -> None:
        """Move the clock, fire passed deadlines and delayed replies, then run until idle."""
        target = self.clock.now() + _delay(by)
        # Stop at each intermediate deadline so retries scheduled on the way also fire in time.
        for _ in range(10_000):
            upcoming = [d.due for d in self._delayed if d.due <= target]
            due = await self.store.due(target, 1)
            deadline = due[0].next_deadline_at if due else None
            moments = [m for m in [*upcoming, deadline] if m is not None]
            if not moments:
                break
            self.clock.set(max(min(moments), self.clock.now()))
            await self.orchestrator.fire_due()
            await self.run_until_idle()
        self.clock.set(target)
        await self.orchestrator.fire_due()
        await self.run_until_idle()

    def _due_delayed(self) -> list[Envelope]:
        now = self.clock.now()
        ready = sorted(d for d in self._delayed if d.due <= now)
        self._delayed = [d for d in self._delayed if d.due > now]
        return [d.envelope for d in ready]

    async def _deliver(self, envelope: Envelope) -> Envelope | None:
        if envelope.route is RouteKind.EVENT:
            self.events.append(decode_event(envelope))
            return None
        if envelope.route is RouteKind.DEAD_LETTER:
            self.dead_letters.append(envelope)
            return None
        if envelope.route is RouteKind.REPLY:
            return envelope  # a delayed reply coming due
        command = decode_command(envelope)
        self.sent.append(command)
        participant = self.participants.get(command.destination)
        if participant is not None:
            return await participant.process(envelope)
        stub = self.stubs.get(command.destination)
        script = None if stub is None else stub.scripts.get(command.command_type)
        if script is None:
            if self.strict:
                raise LookupError(
                    f"no stub or participant handles {command.command_type} at "
                    f"{command.destination!r}: add harness.stub({command.destination!r})"
                    f".on({command.command_type}).succeed(...)"
                )
            return None
        script.received.append(command)
        answer = script._next()  # noqa: SLF001 - the harness owns its scripts
        if answer.status is None:
            return None
        reply = encode_reply(self._reply(command, answer), command.reply_to or "")
        if answer.delay > timedelta():
            self._sequence += 1
            self._delayed.append(_Delayed(self.clock.now() + answer.delay, self._sequence, reply))
            return None
        return reply

    def _reply(self, command: CommandMessage, answer: _Answer) -> ReplyMessage:
        data: Any = answer.data
        if callable(data):
            data = data(command)
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        return ReplyMessage.answering(
            command,
            status=answer.status or ReplyStatus.SUCCEEDED,
            at=self.clock.now(),
            data=dict(data or {}),
            error=answer.error,
        )

    # ------------------------------------------------------------------ asserting

    async def saga(self, saga_id: str) -> SagaInstance:
        """The saga as it stands."""
        return await self.orchestrator.get(saga_id)

    def commands(self, saga_id: str | None = None, *, kind: StepKind | None = None) -> list[str]:
        """Command types sent (for one saga, and/or one kind), in order, retries included."""
        return [
            c.command_type
            for c in self.sent
            if (saga_id is None or c.saga_id == saga_id) and (kind is None or c.kind is kind)
        ]

    def compensations(self, saga_id: str | None = None) -> list[str]:
        """Compensation command types sent, in order."""
        return self.commands(saga_id, kind=StepKind.COMPENSATE)

    async def compensated_steps(self, saga_id: str) -> list[str]:
        """Steps whose compensation succeeded, in the order they were compensated."""
        saga = await self.saga(saga_id)
        return [s.name for s in reversed(saga.steps) if s.status is StepStatus.COMPENSATED]
