"""Settings of the RabbitMQ transport."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

__all__ = ["TLS_FILE_OPTIONS", "TLS_OPTIONS", "RabbitSettings"]

TLS_FILE_OPTIONS = ("cafile", "capath", "certfile", "keyfile")
"""Query parameters of an ``amqps://`` URL that name files or directories (aiormq reads them)."""

TLS_OPTIONS = (*TLS_FILE_OPTIONS, "cadata", "no_verify_ssl")
"""Every TLS query parameter aiormq takes from the URL."""

_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    """How :class:`~sagas_rabbitmq.RabbitBus` connects and names its topology.

    Attributes:
        url: The AMQP URL, for example ``amqp://guest:guest@localhost:5672/``; ``amqps://``
            for TLS (port 5671 by default), with the TLS options as query parameters:
            ``cafile`` (the CA that signed the broker's certificate; default: the system's),
            ``capath``, ``cadata``, ``certfile`` and ``keyfile`` (a client certificate), and
            ``no_verify_ssl=1`` (skip verification: never in production). The certificate and
            the host name are verified by default. See docs/operations.md, "TLS".
        prefix: Prefix of every exchange and queue name (``<prefix>.commands`` ...); give each
            environment, or each test run, its own.
        quorum: Declare quorum queues (the default); ``False`` falls back to classic queues,
            where the bus counts redeliveries itself (docs/protocol.md, "Redelivery").
        delivery_limit: How many times a failing message is handed back for redelivery before
            it goes to the dead-letter queue (RabbitMQ's ``x-delivery-limit``): a message is
            delivered at most ``delivery_limit + 1`` times.
        prefetch: Messages the broker sends a subscription ahead of its handlers; ``None``
            means equal to the subscription's concurrency.
        publish_timeout: Seconds a publish may take, confirm included, before it counts as
            failed (aio-pika can otherwise wait for a reconnection indefinitely).
        connect_timeout: Seconds the first connection may take.
        reconnect_interval: Seconds between reconnection attempts after the connection drops.
        close_timeout: Seconds :meth:`~sagas_rabbitmq.RabbitBus.close` waits for handlers in
            flight before cancelling them (their messages are redelivered).
        group: The consumer group; it names event subscription queues, so the processes of
            one group share them (competing consumers) and other groups get their own copies.
        connection_name: Shown by ``rabbitmqctl list_connections``; defaults to
            ``sagas:<prefix>:<group>``.
        reply_affinity: Route the replies to this process's commands back to this process
            (its own reply queue), so several workers of a group do not take turns on a saga
            (each turn costs a reload and an outbox claim). Off: every reply goes to the
            group's shared reply queue.
        reply_affinity_ttl: Seconds a reply waits in a process's own queue before it moves to
            the group's shared queue, where any worker takes it (the process died, or is
            stuck).
        reply_affinity_expires: Seconds after its process stopped consuming it before the
            broker deletes a process's own reply queue (``x-expires``; longer than the TTL, so
            its replies have moved to the shared queue by then). Each process that stops leaves
            its queue this long, so a crash loop of a process without an ``instance_id`` leaves
            one idle queue per restart for this long.
        instance_id: This process's stable name in its own reply queue (a pod name, a host and
            slot): a restarted process with the same id consumes its queue again, so restarts
            leave no queues behind. Unset: a random id per process. Two live processes with one
            id share the queue (it works, without the affinity's benefit; the second logs a
            warning).
    """

    url: str = "amqp://guest:guest@localhost:5672/"
    prefix: str = "sagas"
    quorum: bool = True
    delivery_limit: int = 5
    prefetch: int | None = None
    publish_timeout: float = 5.0
    connect_timeout: float = 10.0
    reconnect_interval: float = 1.0
    close_timeout: float = 10.0
    group: str = "default"
    connection_name: str | None = None
    reply_affinity: bool = True
    reply_affinity_ttl: float = 5.0
    reply_affinity_expires: float = 300.0
    instance_id: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        given = sorted(set(parse_qs(parts.query)) & set(TLS_OPTIONS))
        if given and parts.scheme != "amqps":
            # aiormq would ignore them and connect in plain text: refuse instead.
            raise ValueError(
                f"url has TLS options ({', '.join(given)}) but its scheme is "
                f"{parts.scheme!r}, which connects without TLS; use amqps://"
            )
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"prefix must be a non-empty word, got {self.prefix!r}")
        if self.delivery_limit < 0:
            raise ValueError(f"delivery_limit must be >= 0, got {self.delivery_limit}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 or None, got {self.prefetch}")
        for name in (
            "publish_timeout",
            "connect_timeout",
            "reconnect_interval",
            "close_timeout",
            "reply_affinity_ttl",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.instance_id is not None and not _INSTANCE_ID.match(self.instance_id):
            raise ValueError(
                "instance_id must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit; got {self.instance_id!r}"
            )
        if self.reply_affinity_expires < 2 * self.reply_affinity_ttl + 10:
            raise ValueError(
                "reply_affinity_expires must be at least 2 * reply_affinity_ttl + 10 seconds "
                f"(replies must move to the shared queue first), got {self.reply_affinity_expires}"
            )

    @property
    def client_name(self) -> str:
        """The connection name the broker shows."""
        return self.connection_name or f"sagas:{self.prefix}:{self.group}"
