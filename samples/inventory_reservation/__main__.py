"""``python -m samples.inventory_reservation``: publish the demo carts' events, print two tables.

Saga state lives in a SQLite file (``.sagas/sagas.sqlite3``, ``$SAGAS_SQLITE_PATH`` or
``--db PATH``); ``--memory`` keeps it in memory instead. Reservations a killed run left in
flight are finished first.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from samples.demo_support import demo_parser, demo_store, describe_state, status_cell
from samples.inventory_reservation.demo import DemoRun, finish_leftovers, run_demo

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from samples.inventory_reservation.inventory import Inventory


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = demo_parser(
        "python -m samples.inventory_reservation",
        "Run the event-started inventory-reservation saga demo on the embedded runtime.",
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, console: Console) -> DemoRun:
    async with demo_store(args) as store:
        resumed = await finish_leftovers(store)
        if resumed:
            console.print(f"Finished {resumed} reservation(s) a previous run left in flight.\n")
        return await run_demo(store=store)


def _lines_table(run: DemoRun) -> Table:
    table = Table(title="Reservation sagas (one per cart line)")
    columns = ("line", "scenario", "events published", "final status", "undone", "stock", "time")
    for column in columns:
        table.add_column(column, justify="right" if column == "time" else "left")
    for index, result in enumerate(run.results):
        first = index == 0 or run.results[index - 1].scenario is not result.scenario
        last = index + 1 == len(run.results) or run.results[index + 1].scenario is not (
            result.scenario
        )
        table.add_row(
            f"{result.cart}/{result.line}",
            result.scenario.name if first else "",
            " > ".join(result.events) or "-",
            status_cell(result.status, as_expected=result.as_expected),
            ", ".join(result.compensated) or "-",
            " > ".join(result.effects) or "-",
            f"{result.seconds * 1000:.0f} ms",
            end_section=last,
        )
    return table


def _ledger_table(inventory: Inventory) -> Table:
    table = Table(title="Stock ledger (available + reserved + committed = on hand)")
    for column in ("sku", "on hand", "available", "reserved", "committed", "adds up"):
        table.add_column(column, justify="left" if column == "sku" else "right")
    for sku, level in inventory.stock.items():
        table.add_row(
            sku,
            str(level.on_hand),
            str(level.available),
            str(level.reserved),
            str(level.committed),
            "[green]yes[/green]" if level.adds_up else "[red]NO[/red]",
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 1 if a line ended unexpectedly or the ledger does not add up."""
    args = _arguments(argv)
    console = Console(width=max(Console().width, 120))
    state = describe_state(args)
    console.print(
        "[bold]sagas[/bold] inventory-reservation demo: ItemAdded -> reserve -> OrderCompleted "
        f"-> commit ({state}, in-memory bus, inventory in this process)\n"
    )
    run = asyncio.run(_run(args, console))
    console.print(_lines_table(run))
    for result in run.results:
        if result.problem or result.error:
            why = result.problem or result.error
            console.print(f"  {result.cart}/{result.line}: [dim]{why}[/dim]")
    console.print()
    console.print(_ledger_table(run.inventory))
    unexpected = [r for r in run.results if not r.as_expected]
    if unexpected:
        console.print(f"[red]{len(unexpected)} line(s) ended unexpectedly[/red]")
    if not run.inventory.adds_up:
        console.print("[red]the stock ledger does not add up[/red]")
    if not run.as_expected:
        return 1
    console.print(
        f"\nAll {len(run.results)} lines ended as expected; the ledger adds up, and nothing is "
        "held for a line removed, cleared or abandoned."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
