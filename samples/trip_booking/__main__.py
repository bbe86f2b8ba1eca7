"""``python -m samples.trip_booking``: run the demo batch and print a table.

Saga state lives in a SQLite file (``.sagas/sagas.sqlite3``, ``$SAGAS_SQLITE_PATH`` or
``--db PATH``); ``--memory`` keeps it in memory instead. Trips a killed run left in flight
are finished first.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from samples.demo_support import demo_parser, demo_store, describe_state, status_cell
from samples.trip_booking.demo import TripResult, finish_leftovers, run_demo

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


_LABELS = {
    "flights.book": "flight",
    "hotels.book": "hotel",
    "cars.book": "car",
    "payments.book": "charge",
    "notifications.book": "e-mail",
    "flights.cancel": "cancel flight",
    "hotels.cancel": "cancel hotel",
    "cars.cancel": "cancel car",
    "payments.cancel": "refund",
}


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = demo_parser(
        "python -m samples.trip_booking", "Run the trip-booking saga demo on the embedded runtime."
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, console: Console) -> list[TripResult]:
    async with demo_store(args) as store:
        resumed = await finish_leftovers(store)
        if resumed:
            console.print(f"Finished {resumed} trip(s) a previous run left in flight.\n")
        results, _ = await run_demo(store=store)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 1 if any trip ended differently than its scenario expects."""
    args = _arguments(argv)
    console = Console(width=max(Console().width, 120))
    state = describe_state(args)
    console.print(
        f"[bold]sagas[/bold] trip-booking demo: flight -> hotel -> car -> payment -> confirmation "
        f"({state}, in-memory bus, participants in this process)\n"
    )
    results = asyncio.run(_run(args, console))
    table = Table(title="Trip sagas")
    for column in ("trip", "scenario", "final status", "undone (in order)", "effects", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for result in results:
        table.add_row(
            result.scenario.trip.trip_id,
            result.scenario.name,
            status_cell(result.status, as_expected=result.as_expected),
            ", ".join(result.compensated) or "-",
            " > ".join(_LABELS.get(e, e) for e in result.effects) or "-",
            f"{result.seconds * 1000:.0f} ms",
        )
    console.print(table)
    for result in results:
        if result.error:
            console.print(f"  {result.scenario.trip.trip_id}: [dim]{result.error}[/dim]")
    unexpected = [r for r in results if not r.as_expected]
    if unexpected:
        console.print(f"[red]{len(unexpected)} trip(s) ended unexpectedly[/red]")
        return 1
    console.print(
        f"\nAll {len(results)} trips ended as expected; the undone ones hold no booking, "
        "cancelled newest first."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
