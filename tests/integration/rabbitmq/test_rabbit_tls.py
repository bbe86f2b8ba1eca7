"""RabbitBus over TLS (``amqps://``), through a TLS proxy of the test's own in front of the broker.

The shared broker speaks plain AMQP and may not be reconfigured, so each test puts a
:class:`~tests.integration.tls_support.TlsProxy` (a certificate for ``localhost`` signed by the
session's test CA) in front of it. The URL carries the TLS options; verification is on unless
the URL turns it off.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from sagas_abstractions import Envelope, RouteKind, TransportError
from sagas_rabbitmq import RabbitBus, RabbitSettings
from sagas_rabbitmq.bus import _safe_url
from sagas_rabbitmq.testing import delete_topology
from tests.integration.tls_support import Pki, TlsProxy
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

CONNECT_TIMEOUT = 5.0

UrlFactory = Callable[..., str]
Connect = Callable[[str], Awaitable[RabbitBus]]


def _upstream(amqp_url: str) -> tuple[str, int]:
    parts = urlsplit(amqp_url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def _credentials(amqp_url: str) -> str:
    parts = urlsplit(amqp_url)
    return f"{parts.username or 'guest'}:{parts.password or 'guest'}"


@pytest.fixture
async def proxy(amqp_url: str, pki: Pki) -> AsyncIterator[TlsProxy]:
    """A TLS listener in front of the broker."""
    async with TlsProxy(_upstream(amqp_url), pki.server_context(), postgres=False) as started:
        yield started


@pytest.fixture
def amqps_url(amqp_url: str, proxy: TlsProxy) -> UrlFactory:
    """``amqps://`` URLs: ``amqps_url(host=..., cafile=..., via=another_proxy)``."""

    def make(*, host: str = "localhost", via: TlsProxy = proxy, **options: str | Path) -> str:
        vhost = urlsplit(amqp_url).path or "/"
        query = urlencode({key: str(value) for key, value in options.items()})
        return f"amqps://{_credentials(amqp_url)}@{host}:{via.port}{vhost}?{query}"

    return make


@pytest.fixture
async def tls_connect(amqp_url: str, prefix: str) -> AsyncIterator[Connect]:
    """Connect buses under the test's prefix: closed, and their topology deleted, at the end."""
    connected: list[RabbitBus] = []

    async def factory(url: str) -> RabbitBus:
        bus = await RabbitBus.connect(url, prefix=prefix, connect_timeout=CONNECT_TIMEOUT)
        connected.append(bus)
        return bus

    yield factory
    queues: set[str] = set()
    for bus in connected:
        await bus.close()
        queues |= bus.declared_queues
    await delete_topology(amqp_url, prefix=prefix, queues=queues)


def command(key: str) -> Envelope:
    return Envelope(
        route=RouteKind.COMMAND,
        key=key,
        message_id=f"msg-{uuid.uuid4().hex[:10]}",
        message_type="ReserveInventory",
        correlation_id="saga-1",
        reply_to="sagas.replies.default",
        headers={"x-saga-type": "order", "x-saga-step": "reserve"},
        body=b'{"sku": "A-1"}',
        timestamp=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
    )


async def round_trip(bus: RabbitBus) -> None:
    """Consume a command queue and publish to it: the message arrives."""
    received: list[str] = []

    async def handle(message: Envelope) -> None:
        received.append(message.message_id)

    await bus.subscribe(RouteKind.COMMAND, "inventory", handle)
    sent = command("inventory")
    await bus.publish([sent])
    await eventually(lambda: received == [sent.message_id], what="the command to arrive")


# ---------------------------------------------------------------------- working TLS


async def test_an_amqps_url_with_the_ca_declares_publishes_and_consumes_through_tls(
    proxy: TlsProxy, amqps_url: UrlFactory, pki: Pki, tls_connect: Connect
) -> None:
    bus = await tls_connect(amqps_url(cafile=pki.ca))

    await round_trip(bus)

    assert proxy.tls_sessions == 1
    assert proxy.failed_handshakes == 0


async def test_a_client_certificate_named_in_the_url_is_presented_to_the_broker(
    amqp_url: str, amqps_url: UrlFactory, pki: Pki, tls_connect: Connect
) -> None:
    context = pki.server_context(require_client_cert=True)
    async with TlsProxy(_upstream(amqp_url), context, postgres=False) as strict:
        bus = await tls_connect(
            amqps_url(via=strict, cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
        )

        await round_trip(bus)

        assert strict.client_subjects == ["sagas-client"]
        await bus.close()


async def test_no_verify_ssl_connects_to_any_certificate_and_warns(
    proxy: TlsProxy,
    amqps_url: UrlFactory,
    pki: Pki,
    tls_connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = amqps_url(host="127.0.0.1", cafile=pki.other_ca, no_verify_ssl="1")

    with caplog.at_level(logging.WARNING, logger="sagas.rabbitmq"):
        bus = await tls_connect(url)

    await round_trip(bus)
    assert proxy.tls_sessions == 1
    assert "verification is off" in caplog.text
    assert "guest:guest" not in caplog.text


# ---------------------------------------------------------------------- refused TLS


@pytest.mark.parametrize(
    "case",
    [
        ("localhost", "other_ca", "unable to get local issuer certificate"),
        ("127.0.0.1", "ca", "IP address mismatch"),
        ("localhost", None, "unable to get local issuer certificate"),
    ],
    ids=["another CA", "host name mismatch", "system CAs only"],
)
async def test_a_certificate_the_url_does_not_trust_fails_with_transport_error_and_no_fallback(
    proxy: TlsProxy,
    amqps_url: UrlFactory,
    pki: Pki,
    prefix: str,
    case: tuple[str, str | None, str],
) -> None:
    host, which_ca, reason = case
    options = {} if which_ca is None else {"cafile": getattr(pki, which_ca)}

    with pytest.raises(TransportError) as raised:
        await RabbitBus.connect(
            amqps_url(host=host, **options), prefix=prefix, connect_timeout=CONNECT_TIMEOUT
        )

    message = str(raised.value)
    assert message.startswith(f"RabbitMQ: connecting to amqps://guest:***@{host}:{proxy.port}/")
    assert "the broker's certificate was rejected" in message
    assert reason in message
    await eventually(lambda: proxy.failed_handshakes == 1, what="the proxy to see the refusal")
    assert proxy.tls_sessions == 0  # nothing reached the broker, in TLS or in plain text


async def test_an_unreadable_tls_file_fails_with_transport_error_naming_it(
    proxy: TlsProxy, amqps_url: UrlFactory, pki: Pki, prefix: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    url = amqps_url(cafile=missing)

    with pytest.raises(TransportError, match=f"cafile={missing} does not exist"):
        await RabbitBus.connect(url, prefix=prefix, connect_timeout=CONNECT_TIMEOUT)

    assert proxy.tls_sessions == proxy.failed_handshakes == 0


@pytest.mark.parametrize("option", ["cafile=/ca.pem", "certfile=/c.pem&keyfile=/k.pem"])
def test_tls_options_on_a_plain_amqp_url_are_refused_not_ignored(option: str) -> None:
    with pytest.raises(ValueError, match="use amqps://"):
        RabbitSettings(url=f"amqp://guest:guest@localhost/?{option}")


def test_urls_in_messages_hide_the_password_and_keep_scheme_and_tls_options() -> None:
    url = "amqps://user:s3cret@broker:5671/vh?cafile=/etc/ssl/a@b/ca.pem&certfile=/c.pem"

    assert _safe_url(url) == (
        "amqps://user:***@broker:5671/vh?cafile=/etc/ssl/a@b/ca.pem&certfile=/c.pem"
    )
    assert _safe_url("amqps://broker/?cafile=/a@b.pem") == "amqps://broker/?cafile=/a@b.pem"
