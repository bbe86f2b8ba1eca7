"""Drive carts by publishing their events, and report how each line's reservation ended.

Nothing here starts a saga: each scenario publishes the events a cart and order service would
(``runtime.publish_event``), and the sagas start, wait, commit and release on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from sagas_abstractions import SagaNotFound, SagaStatus, StepStatus
from sagas_core import SagaRuntime
from sagas_core.codec import HEADER_REASON
from sagas_core.testing import InMemoryBus
from samples import demo_support
from samples.inventory_reservation.inventory import Hold, Inventory, inventory_participant
from samples.inventory_reservation.messages import (
    CartCleared,
    ItemAdded,
    ItemRemoved,
    OrderCompleted,
    line_saga_id,
)
from samples.inventory_reservation.saga import reservation_saga

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pydantic import BaseModel

    from sagas_abstractions import SagaInstance, SagaRepository

DEMO_TTL = timedelta(seconds=1)
"""The abandoned cart's time to live (its ``ItemAdded.hold_seconds``): released a second later.

The other carts ask for a hold as long as the demo's ``settle_within``: a line that should be
ordered is never released by the clock first, however slow the machine (the demo would have
given up waiting by then anyway).
"""

demo_saga = reservation_saga(ttl=DEMO_TTL)
"""The reservation saga the demo runs (and resumes): the production one, with a 1 s TTL."""

_POLL = 0.01


class Outcome(StrEnum):
    """How a cart line should end."""

    COMMITTED = "committed"
    """Ordered: the saga completed and the line's units are committed."""
    RELEASED = "released"
    """Removed, cleared or abandoned: the saga compensated and gave the units back."""
    REFUSED = "refused"
    """Out of stock: the saga compensated with nothing to give back."""
    DEAD_LETTERED = "dead-lettered"
    """No saga: the event naming the line went to the dead-letter queue."""


_ENDINGS: dict[Outcome, tuple[SagaStatus | None, tuple[str, ...], tuple[str, ...], Hold | None]] = {
    Outcome.COMMITTED: (SagaStatus.COMPLETED, (), ("reserve", "commit"), Hold.COMMITTED),
    Outcome.RELEASED: (SagaStatus.COMPENSATED, ("reserve",), ("reserve", "release"), Hold.RELEASED),
    Outcome.REFUSED: (SagaStatus.COMPENSATED, (), (), None),
    Outcome.DEAD_LETTERED: (None, (), (), None),
}
"""Each outcome's saga status, undone steps, stock effects and ledger entry for the line."""


class Cart:
    """One shopper's cart: publishes its events and waits (bounded) for what they cause."""

    def __init__(
        self,
        runtime: SagaRuntime,
        bus: InMemoryBus,
        cart_id: str,
        *,
        settle_within: float,
        inventory: Inventory | None = None,
    ) -> None:
        self.runtime = runtime
        self.inventory = inventory
        self.bus = bus
        self.cart_id = cart_id
        self.settle_within = settle_within
        self.events: dict[str, list[str]] = {}
        """The events published about each line, in order."""
        self.dead_letters: dict[str, str] = {}
        """Why the event naming a line was dead-lettered, by line."""
        self._numbers = itertools.count(1)

    def saga_id(self, line: str) -> str:
        """The id of the line's reservation saga."""
        return line_saga_id(self.cart_id, line)

    async def _publish(self, event: BaseModel, lines: tuple[str, ...]) -> str:
        name = type(event).__name__
        message_id = f"{self.cart_id}:{name}:{next(self._numbers)}"
        await self.runtime.publish_event(event, message_id=message_id)
        for line in lines:
            self.events.setdefault(line, []).append(name)
        return message_id

    async def add(
        self, line: str, sku: str, quantity: int, *, times: int = 1, hold: float | None = None
    ) -> None:
        """Publish ``ItemAdded`` (``times`` times: a cart service that publishes it again).

        The line's stock is held ``hold`` seconds without an order (``settle_within`` if unset).
        """
        event = ItemAdded(
            cart_id=self.cart_id,
            line_id=line,
            sku=sku,
            quantity=quantity,
            hold_seconds=hold or self.settle_within,
        )
        for _ in range(times):
            await self._publish(event, (line,))

    async def remove(self, line: str) -> None:
        """Publish ``ItemRemoved``."""
        await self._publish(ItemRemoved(cart_id=self.cart_id, line_id=line), (line,))

    async def clear(self, *lines: str) -> None:
        """Publish ``CartCleared`` naming ``lines``."""
        await self._publish(CartCleared(cart_id=self.cart_id, line_ids=list(lines)), lines)

    async def order(self, *lines: str) -> str:
        """Publish ``OrderCompleted`` for ``lines``; returns its message id."""
        event = OrderCompleted(
            cart_id=self.cart_id, order_id=f"ORD-{self.cart_id}", line_ids=list(lines)
        )
        return await self._publish(event, lines)

    async def _until(
        self, line: str, what: str, check: Callable[[SagaInstance], Awaitable[bool]]
    ) -> None:
        try:
            async with asyncio.timeout(self.settle_within):
                while True:
                    with contextlib.suppress(SagaNotFound):
                        if await check(await self.runtime.orchestrator.get(self.saga_id(line))):
                            return
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            raise TimeoutError(f"{line} never {what} within {self.settle_within}s") from None

    async def started(self, line: str) -> None:
        """Wait until the line's saga exists (its ``ItemAdded`` was handled)."""

        async def check(_: SagaInstance) -> bool:
            return True

        await self._until(line, "started a saga", check)

    async def reserving(self, line: str) -> None:
        """Wait until the line's saga has sent its reservation (the reply is not back yet)."""

        async def check(saga: SagaInstance) -> bool:
            return saga.current_step_name == "reserve"

        await self._until(line, "started reserving", check)

    async def held(self, *lines: str) -> None:
        """Wait until each line's stock is held and its saga waits for the order."""

        async def check(saga: SagaInstance) -> bool:
            return saga.status is SagaStatus.RUNNING and saga.current_step_name == "await-order"

        for line in lines:
            await self._until(line, "held stock", check)

    async def kept(self, line: str) -> None:
        """Wait until the saga has kept an ``OrderCompleted`` that came before its wait step."""

        async def check(saga: SagaInstance) -> bool:
            history = await self.runtime.orchestrator.history(saga.saga_id)
            return any(
                entry.input == "EventReceived" and "early" in (entry.reason or "")
                for entry in history
            )

        await self._until(line, "kept the early OrderCompleted", check)
        self.events[line][-1] += " (kept)"

    async def order_dead_lettered(self, line: str) -> None:
        """Publish ``OrderCompleted`` for ``line`` and wait until it is in the dead-letter queue."""
        message_id = await self.order(line)
        try:
            async with asyncio.timeout(self.settle_within):
                while True:
                    for envelope in self.bus.dead_letters():
                        if envelope.message_id == message_id:
                            self.dead_letters[line] = envelope.headers.get(HEADER_REASON, "")
                            return
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            raise TimeoutError(f"{message_id} was not dead-lettered") from None


@dataclass(frozen=True)
class Scenario:
    """What one cart does, and how each of its lines should end."""

    name: str
    expected: dict[str, Outcome]
    """Line id -> outcome, in the order the table shows them."""
    script: Callable[[Cart], Awaitable[None]]


@dataclass(frozen=True)
class LineResult:
    """How one cart line ended: its saga, the stock ledger and the dead-letter queue."""

    scenario: Scenario
    cart: str
    line: str
    expected: Outcome
    events: list[str]
    status: SagaStatus | None
    """``None``: no saga exists for the line."""
    compensated: list[str]
    effects: list[str]
    hold: Hold | None
    dead_letter: str | None
    error: str | None
    """The saga's error, or why the event naming the line was dead-lettered."""
    problem: str | None
    """What the scenario waited for in vain (it then reports the line as it stands)."""
    seconds: float

    @property
    def as_expected(self) -> bool:
        """Saga status, undone steps, stock effects and ledger entry all fit the outcome."""
        if self.problem is not None:
            return False
        if self.expected is Outcome.DEAD_LETTERED and self.dead_letter is None:
            return False
        ending = (self.status, tuple(self.compensated), tuple(self.effects), self.hold)
        return ending == _ENDINGS[self.expected]


@dataclass
class DemoRun:
    """Every line's result and the inventory they ran against."""

    results: list[LineResult] = field(default_factory=list)
    inventory: Inventory = field(default_factory=Inventory)

    @property
    def as_expected(self) -> bool:
        """Every line ended as expected and the stock ledger adds up."""
        return self.inventory.adds_up and all(r.as_expected for r in self.results)


async def _two_lines_then_checkout(cart: Cart) -> None:
    await cart.add("L1", "MUG-1", 2)
    await cart.add("L2", "TEE-2", 1)
    await cart.held("L1", "L2")
    await cart.order("L1", "L2")


async def _add_then_remove(cart: Cart) -> None:
    await cart.add("L1", "MUG-1", 1)
    await cart.held("L1")
    await cart.remove("L1")


async def _three_lines_then_clear(cart: Cart) -> None:
    await cart.add("L1", "MUG-1", 1)
    await cart.add("L2", "TEE-2", 2)
    await cart.add("L3", "MUG-1", 3)
    await cart.held("L1", "L2", "L3")
    await cart.clear("L1", "L2", "L3")


async def _added_twice(cart: Cart) -> None:
    await cart.add("L1", "TEE-2", 2, times=2)
    await cart.held("L1")
    await cart.order("L1")


async def _out_of_stock(cart: Cart) -> None:
    await cart.add("L1", "LAMP-3", 2)  # one lamp left


async def _order_before_stock_confirmed(cart: Cart) -> None:
    await cart.add("L1", "SOFA-7", 1)  # the warehouse checks the shelf before it confirms a sofa
    await cart.reserving("L1")
    await cart.order("L1")
    await cart.kept("L1")  # the order came first: the saga keeps it for its wait step
    if cart.inventory is not None:
        cart.inventory.confirm("SOFA-7")  # now the reservation is confirmed, and committed


async def _abandoned(cart: Cart) -> None:
    await cart.add("L1", "MUG-1", 1, hold=DEMO_TTL.total_seconds())
    await cart.held("L1")  # then nothing: the TTL releases it


async def _order_for_unknown_line(cart: Cart) -> None:
    await cart.order_dead_lettered("L9")


def scenarios() -> list[Scenario]:
    """The demo carts, one scenario each."""
    held, freed = Outcome.COMMITTED, Outcome.RELEASED
    ttl = f"{DEMO_TTL.total_seconds():g} s"
    return [
        Scenario("two lines, checkout", {"L1": held, "L2": held}, _two_lines_then_checkout),
        Scenario("add, remove", {"L1": freed}, _add_then_remove),
        Scenario(
            "three lines, clear cart",
            {"L1": freed, "L2": freed, "L3": freed},
            _three_lines_then_clear,
        ),
        Scenario("ItemAdded twice", {"L1": held}, _added_twice),
        Scenario("out of stock", {"L1": Outcome.REFUSED}, _out_of_stock),
        Scenario("order before stock held", {"L1": held}, _order_before_stock_confirmed),
        Scenario(f"abandoned (TTL {ttl})", {"L1": freed}, _abandoned),
        Scenario("order, line never added", {"L9": Outcome.DEAD_LETTERED}, _order_for_unknown_line),
    ]


async def finish_leftovers(store: SagaRepository, *, settle_within: float = 10.0) -> int:
    """Finish the reservations a killed run left in flight, against a scratch inventory.

    Their inventory died with that run: the ones still waiting for an order outlive their hold
    (at most ``settle_within``, as the demo's carts ask) and release nothing that the new batch
    holds.
    """
    return await demo_support.finish_leftovers(
        store, demo_saga, [inventory_participant(Inventory())], settle_within=2 * settle_within
    )


async def run_demo(
    *, store: SagaRepository | None = None, settle_within: float = 10.0, run_id: str | None = None
) -> DemoRun:
    """Run every scenario at once on the embedded runtime, by publishing events only.

    Args:
        store: Where saga state lives; in memory by default.
        settle_within: Seconds each wait of a scenario, and each saga, may take.
        run_id: Makes this run's cart ids (and so saga ids) unique in a store that keeps
            earlier runs' sagas; random by default.
    """
    # The sofa's shelf check waits for the script's confirm (bounded by settle_within, not by a
    # guess at how fast the order is kept): the reserve step's own retries bound it too.
    run = DemoRun(inventory=Inventory(slow_seconds=settle_within))
    run_id = run_id or secrets.token_hex(3)
    bus = InMemoryBus()
    runtime = SagaRuntime(
        sagas=[demo_saga],
        participants=[inventory_participant(run.inventory)],
        store=store,
        bus=bus,
        relay_lease=demo_support.RELAY_LEASE,
    )
    try:
        async with runtime:

            async def play(number: int, scenario: Scenario) -> list[LineResult]:
                began = time.perf_counter()
                cart = Cart(
                    runtime,
                    bus,
                    f"cart-{run_id}-{number}",
                    settle_within=settle_within,
                    inventory=run.inventory,
                )
                problem = None
                try:
                    await scenario.script(cart)
                except TimeoutError as exc:  # the lines are reported as they stand: unexpected
                    problem = str(exc) or "gave up waiting"
                return [
                    await _line_result(
                        cart,
                        line,
                        scenario=scenario,
                        inventory=run.inventory,
                        number=number,
                        problem=problem,
                        began=began,
                    )
                    for line in scenario.expected
                ]

            played = await asyncio.gather(
                *(play(number, s) for number, s in enumerate(scenarios(), start=1))
            )
            with contextlib.suppress(TimeoutError):  # e.g. a duplicate still being ignored
                await bus.wait_idle(timeout=settle_within)
    finally:
        await bus.close()
    run.results = [result for results in played for result in results]
    return run


async def _line_result(
    cart: Cart,
    line: str,
    *,
    scenario: Scenario,
    inventory: Inventory,
    number: int,
    problem: str | None,
    began: float,
) -> LineResult:
    saga_id = cart.saga_id(line)
    saga: SagaInstance | None = None
    if problem is None and scenario.expected[line] is not Outcome.DEAD_LETTERED:
        try:  # the script may end before its last event was handled
            await cart.started(line)
        except TimeoutError as exc:
            problem = str(exc)
    with contextlib.suppress(SagaNotFound):
        try:
            saga = await cart.runtime.wait_for(saga_id, timeout=cart.settle_within)
        except TimeoutError:  # reported as it stands: still active, so unexpected
            saga = await cart.runtime.orchestrator.get(saga_id)
    dead_letter = cart.dead_letters.get(line)
    error = None if dead_letter is None else f"dead-lettered: {dead_letter}"
    if saga is not None and saga.error is not None:
        error = f"{saga.error.code}: {saga.error.message}"
    return LineResult(
        scenario=scenario,
        cart=f"cart-{number}",
        line=line,
        expected=scenario.expected[line],
        events=cart.events.get(line, []),
        status=None if saga is None else saga.status,
        compensated=[]
        if saga is None
        else [s.name for s in reversed(saga.steps) if s.status is StepStatus.COMPENSATED],
        effects=inventory.effects(saga_id),
        hold=inventory.state_of(saga_id),
        dead_letter=dead_letter,
        error=error,
        problem=problem,
        seconds=time.perf_counter() - began,
    )
