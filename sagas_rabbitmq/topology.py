"""Names and arguments of the exchanges and queues (docs/protocol.md, "Topology").

Everything here is pure: the bus declares what this module describes. Keeping the names in one
place lets operators and tests find every queue of a prefix, and keeps the arguments of a
queue identical wherever it is declared (RabbitMQ refuses a redeclaration with other
arguments: 406 PRECONDITION_FAILED).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sagas_abstractions import RouteKind

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DELIVERY_COUNT_HEADER",
    "ROUTING_KEY_HEADER",
    "Topology",
    "queue_safe",
]

DELIVERY_COUNT_HEADER = "x-sagas-delivery-count"
"""Deliveries so far of a message in a classic queue (quorum queues count by themselves)."""

ROUTING_KEY_HEADER = "x-sagas-routing-key"
"""The original routing key of a message republished to a classic queue for a retry."""

DEAD_LETTER_REASON_HEADER = "x-death-reason"
"""Why a message reached the dead-letter queue, in words (added by the consumer side)."""


_UNSAFE = re.compile(r"[^a-zA-Z0-9_.:-]")
_WILDCARDS = {"*": "any", "#": "all"}


def queue_safe(key: str) -> str:
    """``key`` as part of a queue name (AMQP allows only letters, digits and ``-_.:``).

    A key with other characters (topic wildcards, say) has them replaced and gets a short hash
    of the original appended, so two different keys never share a queue.
    """
    if not _UNSAFE.search(key):
        return key
    words = ".".join(_WILDCARDS.get(word, word) for word in key.split("."))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', words)}.{digest}"


@dataclass(frozen=True, slots=True)
class Topology:
    """The broker objects of one prefix.

    Attributes:
        prefix: Prefix of every name.
        quorum: Quorum queues (else classic).
        delivery_limit: ``x-delivery-limit`` of quorum queues (redeliveries before dead-lettering).
        group: Names event subscription queues.
    """

    prefix: str = "sagas"
    quorum: bool = True
    delivery_limit: int = 5
    group: str = "default"

    # ------------------------------------------------------------------ exchanges

    @property
    def commands_exchange(self) -> str:
        """Direct exchange; routing key = participant destination."""
        return f"{self.prefix}.commands"

    @property
    def replies_exchange(self) -> str:
        """Direct exchange; routing key = the command's ``reply_to``."""
        return f"{self.prefix}.replies"

    @property
    def events_exchange(self) -> str:
        """Topic exchange; routing key = ``<saga-type>.<event-kind>``."""
        return f"{self.prefix}.events"

    @property
    def dead_letter_exchange(self) -> str:
        """Fanout exchange feeding the dead-letter queue (every queue's DLX)."""
        return f"{self.prefix}.dead-letter"

    def exchanges(self) -> list[tuple[str, str]]:
        """Every exchange as ``(name, AMQP type)``, in declaration order."""
        return [
            (self.dead_letter_exchange, "fanout"),
            (self.commands_exchange, "direct"),
            (self.replies_exchange, "direct"),
            (self.events_exchange, "topic"),
        ]

    def exchange_for(self, route: RouteKind) -> str:
        """The exchange an envelope of ``route`` is published to."""
        return {
            RouteKind.COMMAND: self.commands_exchange,
            RouteKind.REPLY: self.replies_exchange,
            RouteKind.EVENT: self.events_exchange,
            RouteKind.DEAD_LETTER: self.dead_letter_exchange,
        }[route]

    @staticmethod
    def mandatory(route: RouteKind) -> bool:
        """Whether an unroutable publish on ``route`` is an error.

        Events are published without ``mandatory``: nobody listening is normal for a
        status-change topic, and the broker still confirms the message.
        """
        return route is not RouteKind.EVENT

    # ------------------------------------------------------------------ queues

    @property
    def dead_letter_queue(self) -> str:
        """The one dead-letter queue of the prefix."""
        return f"{self.prefix}.dead-letter"

    def command_queue(self, destination: str) -> str:
        """The queue of a participant destination."""
        return f"{self.prefix}.commands.{queue_safe(destination)}"

    def reply_queue(self, key: str) -> str:
        """The queue of a reply address.

        An address that already starts with ``<prefix>.replies.`` (the orchestrator's
        ``sagas.replies.<group>`` under the default prefix) names its queue itself; any other
        address gets that prefix.
        """
        own = f"{self.replies_exchange}."
        name = key if key.startswith(own) else f"{own}{key}"
        return queue_safe(name)

    @staticmethod
    def affinity_key(key: str, instance: str) -> str:
        """The reply address of one process of the group that reads ``key``'s replies."""
        return f"{key}@{instance}"

    def affinity_queue(self, key: str, instance: str) -> str:
        """The queue of a process's own replies (see :meth:`affinity_arguments`)."""
        return f"{self.reply_queue(key)}.own.{queue_safe(instance)}"

    def affinity_arguments(self, key: str, *, ttl: float, expires: float) -> dict[str, Any]:
        """Arguments of a process's own reply queue.

        A reply not taken within ``ttl`` seconds (its process died, or is stuck) expires into
        the group's shared reply queue (dead-lettered to the replies exchange under ``key``),
        where any worker of the group takes it; the broker deletes the queue ``expires``
        seconds after its process stopped consuming it.
        """
        arguments = self.queue_arguments()
        arguments.update(
            {
                "x-dead-letter-exchange": self.replies_exchange,
                "x-dead-letter-routing-key": key,
                "x-message-ttl": round(ttl * 1000),
                "x-expires": round(expires * 1000),
            }
        )
        return arguments

    def event_queue(self, pattern: str, ordinal: int = 1) -> str:
        """The queue of the ``ordinal``-th subscription to ``pattern`` in this group."""
        name = f"{self.events_exchange}.{self.group}.{queue_safe(pattern)}"
        return name if ordinal == 1 else f"{name}.{ordinal}"

    def queue_arguments(self) -> dict[str, Any]:
        """Arguments of every command, reply and event queue."""
        arguments: dict[str, Any] = {"x-dead-letter-exchange": self.dead_letter_exchange}
        if self.quorum:
            arguments.update(
                {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.delivery_limit,
                    # Keep a message in its queue until the dead-letter queue confirms it.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
            )
        else:
            arguments["x-queue-type"] = "classic"
        return arguments

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the dead-letter queue: no limit and no DLX of its own."""
        return {"x-queue-type": "quorum" if self.quorum else "classic"}
