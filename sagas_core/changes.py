"""What a decision writes: the :class:`~sagas_abstractions.SagaChange` of one committed input.

The orchestrator and the parking of sagas it cannot decide both save decisions; this module is
the one place that turns a :class:`~sagas_core.engine.Decision` into the saga row, the outbox
messages (commands, dead letters, status events as configured), the history rows and the inbox
row of one ``save``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from sagas_abstractions import EventKind, SagaChange
from sagas_core.codec import encode_command, encode_dead_letter, encode_event

if TYPE_CHECKING:
    from sagas_abstractions import Envelope, InboxEntry
    from sagas_core.engine import Decision
    from sagas_core.telemetry import Telemetry

__all__ = ["ChangeBuilder", "StatusEvents"]


class StatusEvents(StrEnum):
    """Which status events the orchestrator publishes to the saga-events topic."""

    ALL = "all"
    """Every status change, per step too (the default): what dashboards follow."""
    LIFECYCLE = "lifecycle"
    """The saga's own changes (started, compensating, completed, compensated, failed, resolved,
    operator action), not each step's: a third of the messages of a 3-step saga."""
    NONE = "none"
    """None: nobody follows sagas on the bus (history and telemetry still record everything)."""


_STEP_EVENTS = frozenset(
    {
        EventKind.STEP_COMPLETED,
        EventKind.STEP_FAILED,
        EventKind.STEP_RETRY_SCHEDULED,
        EventKind.STEP_DEFERRED,
        EventKind.STEP_COMPENSATED,
    }
)

# Asked on every commit: module constants instead of the class lookups of enum members.
_ALL_EVENTS, _LIFECYCLE_EVENTS = StatusEvents.ALL, StatusEvents.LIFECYCLE


class ChangeBuilder:
    """Turns decisions into the changes one ``save`` writes.

    Args:
        reply_to: The reply queue every command names.
        status_events: Which status events go to the outbox.
        telemetry: Stamps the deciding span's context on the outgoing messages.
    """

    def __init__(self, *, reply_to: str, status_events: StatusEvents, telemetry: Telemetry) -> None:
        self.reply_to = reply_to
        self.status_events = status_events
        self.telemetry = telemetry

    def change(
        self,
        decision: Decision,
        *,
        expected_version: int | None,
        inbox: InboxEntry | None,
        status_only: bool = False,
    ) -> SagaChange:
        """The change that commits ``decision``.

        Args:
            decision: What the engine decided.
            expected_version: The version the saga had when loaded (``None``: a new saga).
            inbox: The message to record as processed with it, if any.
            status_only: Written from a partial view of the row (a saga that does not parse).
        """
        return SagaChange(
            instance=decision.instance,
            expected_version=expected_version,
            outbox=self.envelopes(decision),
            history=decision.history,
            inbox=inbox,
            status_only=status_only,
        )

    def envelopes(self, decision: Decision) -> list[Envelope]:
        """The messages ``decision`` sends: commands, dead letters, status events."""
        # Lists, not generators, and none for what a decision does not have: it makes a
        # handful of messages, and a generator costs about as much as encoding one.
        reply_to = self.reply_to
        envelopes = [encode_command(command, reply_to=reply_to) for command in decision.commands]
        if decision.dead_letters:
            envelopes += [encode_dead_letter(dead) for dead in decision.dead_letters]
        if decision.events:
            if self.status_events is _ALL_EVENTS:
                envelopes += [encode_event(event) for event in decision.events]
            elif self.status_events is _LIFECYCLE_EVENTS:
                envelopes += [
                    encode_event(event)
                    for event in decision.events
                    if event.kind not in _STEP_EVENTS
                ]
        # The deciding span's context travels with the outbox rows (published after a restart,
        # a message still joins its saga's trace).
        return self.telemetry.stamp(envelopes)  # unchanged while tracing is off
