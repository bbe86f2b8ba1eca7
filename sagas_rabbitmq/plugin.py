"""The RabbitMQ transport as a sagas plugin: entry point ``rabbitmq`` in ``sagas.transports``.

The core never imports this package; it finds :data:`transport` through the entry point that
``sagas`` declares (see :mod:`sagas_core.plugins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagas_rabbitmq import host
from sagas_rabbitmq.bus import RabbitBus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sagas_abstractions import MessageBus
    from sagas_core.settings import SagasSettings

__all__ = ["RabbitTransportPlugin", "transport"]


class RabbitTransportPlugin:
    """Connects a :class:`RabbitBus` from a host's settings; runs the participant host."""

    name = "rabbitmq"
    schemes = frozenset({"amqp", "amqps"})

    async def connect(self, url: str, settings: SagasSettings) -> MessageBus:
        """A :class:`RabbitBus` at ``url``, its topology declared, configured by ``settings``."""
        bus: MessageBus = await RabbitBus.connect(
            url,
            prefix=settings.rabbitmq_prefix,
            quorum=settings.rabbitmq_quorum,
            delivery_limit=settings.delivery_limit,
            prefetch=settings.prefetch,
            group=settings.group,
            reply_affinity=settings.rabbitmq_reply_affinity,
            instance_id=settings.instance_id,
        )
        return bus

    def run_participants(self, argv: Sequence[str]) -> int:
        """Run :mod:`sagas_rabbitmq.host` (``sagas participant``); returns the exit status."""
        return host.main(list(argv))

    def __repr__(self) -> str:
        return "<sagas transport rabbitmq>"


transport = RabbitTransportPlugin()
"""The plugin object the ``sagas.transports`` entry point names."""
