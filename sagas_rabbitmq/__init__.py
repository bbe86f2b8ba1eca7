"""RabbitMQ transport for sagas (aio-pika): topology, confirmed publishing, consumers.

Install with ``pip install 'sagas[rabbitmq]'``. The transport itself lands with the RabbitMQ
issue; until then this package only checks that its dependency is present.
"""

try:
    import aio_pika  # noqa: F401 - imported to fail early with an install hint
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sagas_rabbitmq needs aio-pika: install it with  pip install 'sagas[rabbitmq]'"
    ) from exc

__all__: list[str] = []
