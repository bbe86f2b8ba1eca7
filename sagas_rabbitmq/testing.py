"""Helpers for tests against a real broker: unique prefixes, clean-up, and fault injection.

Tests give each run (or each test) its own prefix, so they never see each other's messages,
and delete what they declared afterwards. Fault injection closes only the connections of one
prefix (``rabbitmqctl close_connection``), so other users of a shared broker are unaffected.
``rabbitmqctl`` must be on ``PATH`` for :func:`rabbitmqctl` and the functions that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import uuid
from typing import TYPE_CHECKING

import aio_pika

from sagas_rabbitmq.errors import BROKER_ERRORS
from sagas_rabbitmq.topology import Topology

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "close_connections",
    "delete_topology",
    "list_consumers",
    "list_exchanges",
    "list_queues",
    "rabbitmqctl",
    "rabbitmqctl_available",
    "sweep",
    "unique_prefix",
]

_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


def unique_prefix(root: str = "sagas-test") -> str:
    """A prefix no other run uses: ``<root>-<8 hex digits>``."""
    return f"{root}-{uuid.uuid4().hex[:8]}"


def rabbitmqctl_available() -> bool:
    """Whether ``rabbitmqctl`` is on ``PATH``."""
    return shutil.which("rabbitmqctl") is not None


def rabbitmqctl(*args: str, timeout: float = 30.0) -> str:
    """Run ``rabbitmqctl -q <args>`` and return its output.

    Raises:
        subprocess.CalledProcessError: It failed.
        subprocess.TimeoutExpired: It took longer than ``timeout`` seconds.
    """
    executable = shutil.which("rabbitmqctl") or "rabbitmqctl"
    return subprocess.run(  # noqa: S603 - fixed executable, arguments from our own code
        [executable, "-q", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    ).stdout


def list_queues(prefix: str = "") -> dict[str, tuple[int, int]]:
    """``{queue name: (messages, consumers)}`` for every queue whose name starts with ``prefix``."""
    out = rabbitmqctl("list_queues", "--no-table-headers", "name", "messages", "consumers")
    queues = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].startswith(prefix):  # noqa: PLR2004 - three columns
            queues[parts[0]] = (int(parts[1]), int(parts[2]))
    return queues


def list_consumers(prefix: str = "") -> dict[str, int]:
    """``{queue name: consumers}`` for queues starting with ``prefix`` that have consumers.

    Unlike the ``consumers`` column of ``list_queues`` (refreshed every few seconds for quorum
    queues), this asks the channels, so it is current.
    """
    out = rabbitmqctl("list_consumers", "--no-table-headers", "queue_name")
    counts: dict[str, int] = {}
    for name in out.splitlines():
        if name and name.startswith(prefix):
            counts[name] = counts.get(name, 0) + 1
    return counts


def close_connections(name_contains: str, reason: str = "test") -> int:
    """Close every connection whose client-provided name contains ``name_contains``.

    Returns:
        How many connections were closed.
    """
    out = rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    closed = 0
    for line in out.splitlines():
        pid, _, properties = line.partition("\t")
        match = _CONNECTION_NAME.search(properties)
        if match and name_contains in match.group(1):
            with contextlib.suppress(subprocess.CalledProcessError):
                rabbitmqctl("close_connection", pid, reason)
                closed += 1
    return closed


async def delete_topology(
    url: str,
    *,
    prefix: str,
    queues: Iterable[str] = (),
    timeout: float = 10.0,
) -> None:
    """Delete the given queues and the exchanges of ``prefix``, whatever they hold."""
    exchanges = [name for name, _ in Topology(prefix=prefix).exchanges()]
    await _delete(url, queues=queues, exchanges=exchanges, timeout=timeout)


async def _delete(
    url: str, *, queues: Iterable[str], exchanges: Iterable[str], timeout: float
) -> None:
    async with asyncio.timeout(timeout):
        connection = await aio_pika.connect(url, timeout=timeout)
        async with connection:
            for queue in queues:
                # A channel per deletion: one failure closes only its channel.
                channel = await connection.channel()
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.queue_delete(queue, if_unused=False, if_empty=False)
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()
            channel = await connection.channel()
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
            await channel.close()


def list_exchanges(prefix: str = "") -> list[str]:
    """Names of the exchanges that start with ``prefix``."""
    out = rabbitmqctl("list_exchanges", "--no-table-headers", "name")
    return [name for name in out.splitlines() if name and name.startswith(prefix)]


async def sweep(url: str, *prefixes: str, timeout: float = 30.0) -> list[str]:
    """Delete every queue and exchange whose name starts with one of ``prefixes``.

    Returns:
        The names deleted.
    """
    if not prefixes:
        return []
    start = tuple(prefixes)
    queues = [name for name in list_queues() if name.startswith(start)]
    exchanges = [name for name in list_exchanges() if name.startswith(start)]
    await _delete(url, queues=queues, exchanges=exchanges, timeout=timeout)
    return queues + exchanges
