"""What every sample's command line shares: state, a killed run's leftovers, status cells.

Each sample runs on the embedded default: saga state in a SQLite file (``--db PATH``,
``$SAGAS_SQLITE_PATH`` or ``.sagas/sagas.sqlite3``), or in memory with ``--memory``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from sagas_abstractions import SagaStatus
from sagas_core import SagaRuntime, close_store, open_store
from sagas_core.embedded import default_sqlite_path
from sagas_core.testing import InMemorySagaStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from sagas_abstractions import SagaRepository
    from sagas_core import Participant, SagaDefinition

__all__ = [
    "RELAY_LEASE",
    "demo_parser",
    "demo_store",
    "describe_state",
    "finish_leftovers",
    "status_cell",
]

RELAY_LEASE = 1.0
"""Outbox lease of the demos: a killed run's claimed messages go out again a second later."""

_STATUS_STYLES = {
    SagaStatus.COMPLETED: "green",
    SagaStatus.COMPENSATED: "yellow",
    SagaStatus.FAILED: "red",
}


def status_cell(status: SagaStatus | None, *, as_expected: bool, other: str = "red") -> str:
    """A final status for a demo table (rich markup): coloured, marked when unexpected.

    ``other`` colours the statuses a demo does not expect to end in; ``None`` is "no saga".
    """
    if status is None:
        text = "[magenta]no saga[/magenta]"
    else:
        style = _STATUS_STYLES.get(status, other)
        text = f"[{style}]{status.value}[/{style}]"
    return text if as_expected else f"{text} [red](unexpected)[/red]"


def demo_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--db PATH`` / ``--memory`` choice every sample offers."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help="SQLite file holding saga state (default: $SAGAS_SQLITE_PATH or .sagas/sagas.sqlite3)",
    )
    where.add_argument(
        "--memory", action="store_true", help="keep saga state in memory (lost on exit)"
    )
    return parser


def describe_state(args: argparse.Namespace) -> str:
    """Where the parsed arguments keep saga state, in words."""
    return "in-memory state" if args.memory else f"state in {args.db or default_sqlite_path()}"


@contextlib.asynccontextmanager
async def demo_store(args: argparse.Namespace) -> AsyncIterator[SagaRepository]:
    """The store the parsed arguments name, closed at the end."""
    store: SagaRepository = (
        InMemorySagaStore() if args.memory else await open_store(sqlite_path=args.db)
    )
    try:
        yield store
    finally:
        await close_store(store)


async def finish_leftovers(
    store: SagaRepository,
    saga: SagaDefinition,
    participants: Iterable[Participant],
    *,
    settle_within: float = 10.0,
) -> int:
    """Finish the sagas of ``saga`` a killed run left in flight in ``store``; returns how many.

    Their services died with that run, so they finish against scratch ``participants`` of their
    own and cannot touch the numbers of the new batch.
    """
    left = [
        instance.saga_id
        for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING)
        for instance in await store.find(status=status, saga_type=saga.name, limit=10_000)
    ]
    if not left:
        return 0
    runtime = SagaRuntime(
        sagas=[saga], participants=participants, store=store, relay_lease=RELAY_LEASE
    )
    async with runtime:
        await asyncio.gather(
            *(runtime.wait_for(saga_id, timeout=settle_within) for saga_id in left),
            return_exceptions=True,  # one that does not settle is reported by `sagas list`
        )
    return len(left)
