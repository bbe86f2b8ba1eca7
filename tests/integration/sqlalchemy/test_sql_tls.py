"""The SQL store over TLS, through a TLS proxy of the test's own in front of PostgreSQL.

The shared server does not speak TLS and may not be reconfigured, so each test puts a
:class:`~tests.integration.tls_support.TlsProxy` in front of it: the proxy answers the client's
``SSLRequest``, runs the handshake with a certificate for ``localhost`` signed by the session's
test CA, and forwards the decrypted stream to the server as a plain connection. ``pg_stat_ssl``
cannot see that TLS, so the tests ask the proxy (every connection through TLS, none in plain
text) and the client (``ssl_in_use``) instead.

Both drivers take libpq's parameters in the URL (``sslmode``, ``sslrootcert``, ``sslcert``,
``sslkey``); asyncpg also takes its own ``ssl=<mode>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from sagas_abstractions import StoreError
from sagas_sqlalchemy import SqlSagaStore
from sagas_sqlalchemy.engine import asyncpg_tls_dsn, sync_url
from tests.contracts.store_contract import insert, make_instance
from tests.integration.sqlalchemy.sql_support import sql_store, unique_prefix
from tests.integration.tls_support import Pki, TlsProxy
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DRIVERS = ["psycopg", "asyncpg"]

UrlFactory = Callable[..., str]


def _upstream(postgres_url: str) -> tuple[str, int]:
    parsed = sa.make_url(postgres_url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


@pytest.fixture
async def proxy(postgres_url: str, pki: Pki) -> AsyncIterator[TlsProxy]:
    """A TLS listener in front of PostgreSQL."""
    async with TlsProxy(_upstream(postgres_url), pki.server_context(), postgres=True) as started:
        yield started


@pytest.fixture
def tls_url(postgres_url: str) -> UrlFactory:
    """URLs to a proxy: ``tls_url(proxy, driver, host=..., sslmode=..., ...)``."""

    def make(proxy: TlsProxy, driver: str, *, host: str = "localhost", **query: str | Path) -> str:
        url = sa.make_url(postgres_url).set(
            drivername=f"postgresql+{driver}",
            host=host,
            port=proxy.port,
            query={key: str(value) for key, value in query.items()},
        )
        return url.render_as_string(hide_password=False)

    return make


async def save_and_load(store: SqlSagaStore) -> None:
    saga = make_instance()
    await store.save([insert(saga)])
    loaded = await store.load(saga.saga_id)
    assert loaded is not None
    assert loaded.saga_id == saga.saga_id


# ---------------------------------------------------------------------- working TLS


@pytest.mark.parametrize("driver", DRIVERS)
async def test_sslmode_verify_full_with_the_ca_saves_and_loads_through_tls(
    proxy: TlsProxy, tls_url: UrlFactory, pki: Pki, driver: str
) -> None:
    url = tls_url(proxy, driver, sslmode="verify-full", sslrootcert=pki.ca)

    async with sql_store(url) as store:
        await save_and_load(store)

    assert proxy.tls_sessions >= 1
    assert proxy.failed_handshakes == proxy.plain_attempts == 0


async def test_the_psycopg_fast_path_connections_use_tls_too(
    proxy: TlsProxy, tls_url: UrlFactory, pki: Pki
) -> None:
    url = tls_url(proxy, "psycopg", sslmode="verify-full", sslrootcert=pki.ca)

    async with sql_store(url) as store:
        await save_and_load(store)  # through the lane: its own connections, opened for it
        assert store._lane is not None
        async with store._lane.connection() as conn:
            assert conn.pgconn.ssl_in_use
        assert await store.find()  # through the engine's pool

    assert proxy.tls_sessions >= 2  # the pool's and the lane's
    assert proxy.failed_handshakes == proxy.plain_attempts == 0


async def test_asyncpg_takes_its_own_ssl_parameter_too(
    proxy: TlsProxy, tls_url: UrlFactory
) -> None:
    # No CA in the URL: ``require`` encrypts without verifying (libpq's rule, asyncpg's too).
    url = tls_url(proxy, "asyncpg", ssl="require")

    async with sql_store(url) as store:
        await save_and_load(store)

    assert proxy.tls_sessions >= 1
    assert proxy.plain_attempts == 0


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_client_certificate_named_in_the_url_is_presented_to_the_server(
    postgres_url: str, tls_url: UrlFactory, pki: Pki, driver: str
) -> None:
    context = pki.server_context(require_client_cert=True)
    async with TlsProxy(_upstream(postgres_url), context, postgres=True) as strict:
        url = tls_url(
            strict,
            driver,
            sslmode="verify-full",
            sslrootcert=pki.ca,
            sslcert=pki.client_cert,
            sslkey=pki.client_key,
        )
        async with sql_store(url) as store:
            await save_and_load(store)

    assert strict.client_subjects
    assert set(strict.client_subjects) == {"sagas-client"}


# ---------------------------------------------------------------------- refused TLS


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    "case",
    [
        ("localhost", "other_ca", ("certificate verify failed",)),
        # libpq names the mismatch; asyncpg reports it as a failed verification
        ("127.0.0.1", "ca", ("does not match host name", "IP address mismatch")),
    ],
    ids=["another CA", "host name mismatch"],
)
async def test_a_certificate_the_url_does_not_trust_fails_with_store_error(
    proxy: TlsProxy,
    tls_url: UrlFactory,
    pki: Pki,
    driver: str,
    case: tuple[str, str, tuple[str, ...]],
) -> None:
    host, which_ca, reasons = case
    url = tls_url(
        proxy, driver, host=host, sslmode="verify-full", sslrootcert=getattr(pki, which_ca)
    )
    store = SqlSagaStore.from_url(url, table_prefix=unique_prefix(), create_tables=True)

    try:
        with pytest.raises(StoreError) as raised:
            await store.initialize()
    finally:
        await store.close()

    message = str(raised.value)
    assert message.startswith("preparing the sagas tables failed: ")
    assert any(reason in message for reason in reasons), message
    await eventually(lambda: proxy.failed_handshakes >= 1, what="the proxy to see the refusal")
    assert proxy.tls_sessions == proxy.plain_attempts == 0  # nothing reached the server


# ---------------------------------------------------------------------- URL forms


def test_asyncpg_urls_carry_libpq_tls_parameters_in_a_dsn() -> None:
    url = sa.make_url(
        "postgresql+asyncpg://app@db/sagas?sslmode=verify-full&sslrootcert=/ca.pem"
        "&application_name=w1"
    )

    rest, dsn = asyncpg_tls_dsn(url)

    assert dsn == "postgresql://?sslmode=verify-full&sslrootcert=%2Fca.pem"
    assert dict(rest.query) == {"application_name": "w1"}
    assert asyncpg_tls_dsn(sa.make_url("postgresql+asyncpg://app@db/sagas?ssl=require")) == (
        sa.make_url("postgresql+asyncpg://app@db/sagas?ssl=require"),
        None,
    )


def test_migrations_of_an_asyncpg_url_keep_its_tls_mode() -> None:
    assert sync_url("postgresql+asyncpg://app@db/sagas?ssl=verify-full").query == {
        "sslmode": "verify-full"
    }
    libpq = "postgresql+asyncpg://app@db/sagas?sslmode=verify-full&sslrootcert=/ca.pem"
    assert dict(sync_url(libpq).query) == {"sslmode": "verify-full", "sslrootcert": "/ca.pem"}
