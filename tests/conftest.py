"""Shared fixtures: where the real services are.

Each service URL comes from the environment first (``SAGAS_TEST_DATABASE_URL``,
``SAGAS_TEST_AMQP_URL``), then the local service on its standard loopback port, then a
testcontainers container when a Docker engine answers. When none is there the test is skipped,
except with ``SAGAS_TEST_REQUIRE_SERVICES=1`` (CI sets it), where the test fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

LOCAL_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]  # noqa: PLC0415 - optional

        docker.from_env(timeout=2).ping()
    except Exception:  # noqa: BLE001 - any failure means "no Docker here"
        return False
    return True


def _unavailable(what: str) -> None:
    message = (
        f"{what} is not reachable: set the URL variable, start the local service, or run Docker"
    )
    if os.environ.get("SAGAS_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"SAGAS_TEST_REQUIRE_SERVICES=1 and {message}", pytrace=False)
    pytest.skip(message)


def _service_url(
    *,
    what: str,
    env_var: str,
    local_url: str,
    default_port: int,
    container: Callable[[contextlib.ExitStack], str],
) -> Iterator[str]:
    configured = os.environ.get(env_var)
    if configured:
        if not _answers(configured, default_port):
            pytest.fail(f"{env_var}={configured!r} does not answer", pytrace=False)
        yield configured
        return
    if _answers(local_url, default_port):
        yield local_url
        return
    if _docker_answers():
        with contextlib.ExitStack() as stack:
            yield container(stack)
        return
    _unavailable(what)


def _postgres_container(stack: contextlib.ExitStack) -> str:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415 - only with Docker

    started = stack.enter_context(PostgresContainer("postgres:16-alpine", driver="psycopg"))
    return str(started.get_connection_url())


def _rabbitmq_container(stack: contextlib.ExitStack) -> str:
    from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415 - only with Docker

    started = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-alpine"))
    host = started.get_container_host_ip()
    port = started.get_exposed_port(started.port)
    return f"amqp://guest:guest@{host}:{port}/"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (psycopg 3) of a PostgreSQL database the tests may use."""
    yield from _service_url(
        what="PostgreSQL",
        env_var="SAGAS_TEST_DATABASE_URL",
        local_url=LOCAL_POSTGRES_URL,
        default_port=5432,
        container=_postgres_container,
    )


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """An AMQP URL of a RabbitMQ broker the tests may use."""
    yield from _service_url(
        what="RabbitMQ",
        env_var="SAGAS_TEST_AMQP_URL",
        local_url=LOCAL_AMQP_URL,
        default_port=5672,
        container=_rabbitmq_container,
    )
