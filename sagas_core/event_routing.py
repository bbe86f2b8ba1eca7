"""Bus events to sagas: which sagas an event starts, advances or cancels, and what it did.

:class:`EventRouter` finds the triggers listening on a delivery's topic, parses the event for
each, and turns it into inputs of the sagas it names: a start, or an applied
:class:`~sagas_abstractions.EventReceived` / :class:`~sagas_abstractions.Cancel`, through the
operations the orchestrator gives it. A saga that is missing or can no longer use the event is
handled by the trigger's :class:`~sagas_core.definition.MissingSagaPolicy`. Parsing and the
topic index are in :mod:`sagas_core.events`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sagas_abstractions import (
    Cancel,
    EventReceived,
    InboxEntry,
    InvalidEvent,
    InvalidSagaData,
    SagaAlreadyExists,
    SagaNotFound,
)
from sagas_core.definition import EventRole, MissingSagaPolicy
from sagas_core.events import EventOutcome, EventRoutes, event_inbox_id, parse_event
from sagas_core.parking import UNDECIDABLE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pydantic import BaseModel

    from sagas_abstractions import Clock, Envelope, SagaInput, SagaInstance
    from sagas_core.definition import EventTrigger, SagaDefinition
    from sagas_core.engine import Decision
    from sagas_core.parking import Undecidable
    from sagas_core.registry import SagaRegistry
    from sagas_core.telemetry import Telemetry

__all__ = ["ApplyInput", "EventRouter", "ParkSaga", "StartSaga"]

_log = logging.getLogger("sagas.orchestrator")

_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class ApplyInput(Protocol):
    """Apply one input to a saga in one unit of work (the orchestrator's)."""

    async def __call__(
        self,
        saga_id: str,
        make: Callable[[SagaInstance], SagaInput | None],
        *,
        inbox: InboxEntry | None,
        saga_type: str | None = None,
    ) -> Decision | None:
        """The decision (``None``: a duplicate message, or ``make`` made no input).

        Raises:
            SagaNotFound: No saga of ``saga_type`` has this id.
            InvalidSagaData: The stored saga cannot be decided (likewise
                :class:`~sagas_abstractions.UnknownSagaType`,
                :class:`~sagas_abstractions.DefinitionChanged`).
        """
        ...


class StartSaga(Protocol):
    """Start a saga, or find the one that has this id already (the orchestrator's)."""

    async def __call__(
        self,
        saga: SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None,
        correlation_id: str | None,
        trace_context: Mapping[str, str] | None,
        cause: tuple[str, str] | None = None,
    ) -> tuple[SagaInstance, bool]:
        """The saga, and whether this call created it (``cause``: source and message id)."""
        ...


class ParkSaga(Protocol):
    """Park a saga that cannot be decided (:meth:`sagas_core.parking.Parking.park`)."""

    async def __call__(
        self,
        saga_id: str,
        problem: Undecidable,
        *,
        inbox: InboxEntry | None,
        message_id: str | None = None,
    ) -> int:
        """1 if the saga was parked now, else 0."""
        ...


class _EventDelivery(NamedTuple):
    """One delivered event as one trigger of one definition sees it."""

    envelope: Envelope
    definition: SagaDefinition
    trigger: EventTrigger
    event: BaseModel
    outcome: EventOutcome


def _kept_early(decision: Decision, definition: SagaDefinition, trigger: EventTrigger) -> bool:
    """Whether an applied event was kept for a wait step the saga has not reached yet."""
    step = None if trigger.step is None else definition.step(trigger.step)
    if step is None:
        return False
    return decision.instance.steps[step.index].early_event is not None


class EventRouter:
    """Applies bus events to the sagas they start, advance or cancel.

    Args:
        registry: The saga definitions (the topic index is rebuilt when one is registered).
        clock: The source of time.
        telemetry: Spans each delivery.
        consumer: The inbox consumer that records each event applied to a saga.
        apply: Applies an input to a saga.
        start: Starts a saga, or finds the one with its id.
        park: Parks a saga that cannot be decided.
    """

    def __init__(
        self,
        registry: SagaRegistry,
        *,
        clock: Clock,
        telemetry: Telemetry,
        consumer: str,
        apply: ApplyInput,
        start: StartSaga,
        park: ParkSaga,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.telemetry = telemetry
        self.consumer = consumer
        self.apply = apply
        self.start = start
        self.park = park
        self._routes: tuple[int, EventRoutes] | None = None

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic a registered saga starts on, waits for or is cancelled by."""
        return self._event_routes().topics

    def _event_routes(self) -> EventRoutes:
        # Definitions are registered, never removed: a new count means a new one.
        if self._routes is None or self._routes[0] != len(self.registry):
            self._routes = (len(self.registry), EventRoutes(self.registry))
        return self._routes[1]

    async def route(self, envelope: Envelope, *, system: str) -> EventOutcome:
        """Apply ``envelope``, a bus event, to every saga it starts, advances or cancels.

        Args:
            envelope: The delivered event.
            system: ``messaging.system`` of the delivery's span.

        Returns:
            What the event did; when ``dead_letter`` is not empty the caller must park the
            event in the dead-letter queue.
        """
        outcome = EventOutcome()
        routes = self._event_routes().get(envelope.key)
        if not routes:
            _log.warning("event %s on topic %r: no saga listens", envelope.message_id, envelope.key)
        with self.telemetry.consume(envelope, system=system):
            for definition, trigger in routes:
                try:
                    event, saga_ids = parse_event(envelope, definition, trigger)
                except InvalidEvent as exc:
                    _log.error("dead-lettering event %s: %s", envelope.message_id, exc)
                    outcome.dead_letter.append(str(exc))
                    continue
                delivery = _EventDelivery(envelope, definition, trigger, event, outcome)
                for saga_id in saga_ids:
                    await self._event_to_saga(delivery, saga_id)
        return outcome

    async def _event_to_saga(self, delivery: _EventDelivery, saga_id: str) -> None:
        envelope, definition, trigger, event, outcome = delivery
        if trigger.role is EventRole.START:
            await self._start_from_event(delivery, saga_id)
            return
        dumped = event.model_dump(mode="json")

        def make(_: SagaInstance) -> SagaInput:
            now = self.clock.now()
            if trigger.role is EventRole.CANCEL:
                return Cancel(event=trigger.name, at=now, message_id=envelope.message_id)
            assert trigger.step is not None  # noqa: S101 - wait_for triggers name their step
            return EventReceived(
                step=trigger.step,
                event=trigger.name,
                at=now,
                message_id=envelope.message_id,
                data=dumped,
            )

        inbox = InboxEntry(self.consumer, event_inbox_id(envelope.message_id, saga_id))
        try:
            decision = await self.apply(saga_id, make, inbox=inbox, saga_type=definition.name)
        except SagaNotFound:
            await self._missing_saga(delivery, saga_id)
            return
        except UNDECIDABLE as problem:
            await self.park(saga_id, problem, inbox=inbox, message_id=envelope.message_id)
            outcome.ignored.append(saga_id)
            return
        if decision is None:  # a duplicate delivery: applied (or refused) once already
            outcome.ignored.append(saga_id)
        elif not decision.changed:
            # The saga exists but can no longer use the event (finished, compensating, step
            # done): as telling as a missing saga, so the same policy decides what to do.
            why = decision.history[0].reason if decision.history else "not applicable"
            self._unmatched(delivery, saga_id, f"which could not use it ({why})")
        elif _kept_early(decision, definition, trigger):
            outcome.kept.append(saga_id)
        else:
            outcome.applied.append(saga_id)

    async def _missing_saga(self, delivery: _EventDelivery, saga_id: str) -> None:
        if delivery.trigger.missing is MissingSagaPolicy.START:
            if await self._start_from_event(delivery, saga_id):
                await self._event_to_saga(delivery, saga_id)  # then the event, as to any saga
            return
        self._unmatched(delivery, saga_id, "which does not exist")

    def _unmatched(self, delivery: _EventDelivery, saga_id: str, why: str) -> None:
        """An event found no saga that could use it: dead-letter it or log it, per policy."""
        envelope, definition, trigger, _, outcome = delivery
        reason = (
            f"event {trigger.name} (message {envelope.message_id}) for {definition.name} saga "
            f"{saga_id}, {why}"
        )
        if trigger.missing is MissingSagaPolicy.DEAD_LETTER:
            _log.warning("%s: dead-lettered", reason)
            outcome.dead_letter.append(reason)
        else:
            _log.info("%s: ignored", reason)
            outcome.ignored.append(saga_id)

    async def _start_from_event(self, delivery: _EventDelivery, saga_id: str) -> bool:
        """Start the saga the event names; ``False`` when the event was dead-lettered instead."""
        envelope, definition, trigger, event, outcome = delivery
        assert trigger.build_data is not None  # noqa: S101 - start triggers can build data
        prefix = f"event {trigger.name} (message {envelope.message_id}) cannot start"
        try:
            data = trigger.build_data(event)
        except Exception as exc:  # noqa: BLE001 - a user data function failed: it always will
            reason = f"{prefix} {definition.name} saga {saga_id}: {type(exc).__name__}: {exc}"
            _log.exception("dead-lettering: %s", reason)
            outcome.dead_letter.append(reason)
            return False
        trace = {k: v for k, v in envelope.headers.items() if k in _TRACE_HEADERS}
        try:
            _, created = await self.start(
                definition,
                data,
                saga_id=saga_id,
                correlation_id=envelope.correlation_id,
                trace_context=trace,
                cause=(f"event:{trigger.name}", envelope.message_id),
            )
        except (InvalidSagaData, SagaAlreadyExists) as exc:
            reason = f"{prefix} it: {exc}"
            _log.error("dead-lettering: %s", reason)
            outcome.dead_letter.append(reason)
            return False
        # A duplicate (or a second event naming the same saga) never starts a second saga.
        (outcome.started if created else outcome.ignored).append(saga_id)
        return True
