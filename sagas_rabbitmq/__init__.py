"""RabbitMQ transport for sagas (aio-pika): topology, confirmed publishing, consumers.

Install with ``pip install 'sagas-orchestrator[rabbitmq]'``. :class:`RabbitBus` implements the
:class:`~sagas_abstractions.MessageBus` port; the wire contract it speaks, which participants in
any language can follow, is ``docs/protocol.md``.

Example:
    ```python
    from sagas_rabbitmq import RabbitBus

    bus = await RabbitBus.connect("amqp://guest:guest@localhost/", prefix="shop")
    ```
"""

try:
    import aio_pika  # noqa: F401 - imported to fail early with an install hint
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sagas_rabbitmq needs aio-pika: install it with  pip install 'sagas-orchestrator[rabbitmq]'"
    ) from exc

from sagas_rabbitmq.bus import RabbitBus
from sagas_rabbitmq.consumer import RabbitSubscription
from sagas_rabbitmq.settings import RabbitSettings
from sagas_rabbitmq.topology import DEAD_LETTER_REASON_HEADER, DELIVERY_COUNT_HEADER, Topology

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DELIVERY_COUNT_HEADER",
    "RabbitBus",
    "RabbitSettings",
    "RabbitSubscription",
    "Topology",
]
