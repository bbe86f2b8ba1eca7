"""Translate aio-pika/aiormq errors into the sagas error tree (``TransportError`` and below)."""

from __future__ import annotations

import asyncio
import ssl

import aiormq.exceptions
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError

from sagas_abstractions import BusUnavailable, Envelope, PublishError, TransportError

__all__ = ["BROKER_ERRORS", "broker_unavailable", "publish_error", "transport_error"]

BROKER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)
"""What the client raises when the broker or the connection fails."""


def _tls_failure(exc: BaseException) -> str | None:
    """What went wrong in a TLS handshake that ``exc`` (or its cause) reports, if it did."""
    seen: BaseException | None = exc
    for _ in range(4):  # aiormq wraps the ssl error once, aio-pika at most once more
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"TLS: the broker's certificate was rejected ({seen.verify_message}); check that "
                "the URL's cafile= names the CA that signed it and that the URL's host name is "
                "one the certificate is issued for"
            )
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        if seen is None:
            return None
        seen = seen.__cause__
    return None


def _describe(exc: BaseException) -> str:
    tls = _tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, aiormq.exceptions.PublishError):
        return f"unroutable (returned by the broker: {exc.args[0] if exc.args else exc})"
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return "rejected by the broker (nack)"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "not confirmed in time (the connection may be recovering)"
    return f"{type(exc).__name__}: {exc}"


def broker_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection or channel is down or recovering.

    Not that a message is wrong: the publish goes through once the connection is back (a TLS
    failure does not).
    """
    if _tls_failure(exc) is not None:
        return False
    if isinstance(exc, aiormq.exceptions.ChannelClosed):
        # Its subclasses are the broker closing the channel over a command it refused
        # (404, 403, 406): a topology or permission problem that waiting does not fix.
        return type(exc) is aiormq.exceptions.ChannelClosed
    return isinstance(
        exc,
        ChannelInvalidStateError
        | aiormq.exceptions.AMQPConnectionError
        | ConnectionError
        | TimeoutError
        | asyncio.TimeoutError,
    )


def publish_error(envelope: Envelope, exc: BaseException) -> PublishError:
    """A :class:`PublishError` naming the envelope and what went wrong.

    A :class:`BusUnavailable` when the connection is down or recovering: a handler that raises
    it has its delivery held, uncounted, instead of handed back (see ``sagas_core.outage``).
    """
    kind = BusUnavailable if broker_unavailable(exc) else PublishError
    return kind(
        f"message {envelope.message_id!r} to {envelope.route.value}/{envelope.key} was not "
        f"accepted: {_describe(exc)}; publishing it again is safe (receivers dedupe)",
        saga_id=envelope.correlation_id,
        saga_type=envelope.headers.get("x-saga-type"),
        step=envelope.headers.get("x-saga-step"),
    )


def transport_error(what: str, exc: BaseException) -> TransportError:
    """A :class:`TransportError` saying what failed; chain ``exc`` with ``raise ... from``."""
    return TransportError(f"RabbitMQ: {what} failed: {_describe(exc)}")
