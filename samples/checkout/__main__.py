"""``python -m samples.checkout``: run the demo batch and print a table.

Saga state lives in a SQLite file (``.sagas/sagas.sqlite3``, ``$SAGAS_SQLITE_PATH`` or
``--db PATH``); ``--memory`` keeps it in memory instead. Checkouts a killed run left in flight
are finished first.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from samples.checkout.demo import CheckoutResult, finish_leftovers, run_demo
from samples.demo_support import demo_parser, demo_store, describe_state, status_cell

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = demo_parser(
        "python -m samples.checkout", "Run the checkout saga demo batch on the embedded runtime."
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, console: Console) -> list[CheckoutResult]:
    async with demo_store(args) as store:
        resumed = await finish_leftovers(store)
        if resumed:
            console.print(f"Finished {resumed} checkout(s) a previous run left in flight.\n")
        results, _ = await run_demo(store=store)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 1 if any checkout ended differently than its scenario expects."""
    args = _arguments(argv)
    console = Console(width=max(Console().width, 120))
    state = describe_state(args)
    console.print(
        f"[bold]sagas[/bold] checkout demo: PlaceOrder -> ProcessPayment -> ReserveInventory "
        f"({state}, in-memory bus, participants in this process)\n"
    )
    results = asyncio.run(_run(args, console))
    table = Table(title="Checkout sagas")
    for column in ("order", "scenario", "final status", "compensated", "effects", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for result in results:
        table.add_row(
            result.scenario.checkout.order_id,
            result.scenario.name,
            status_cell(result.status, as_expected=result.as_expected),
            ", ".join(result.compensated) or "-",
            " > ".join(effect.partition(".")[2] for effect in result.effects) or "-",
            f"{result.seconds * 1000:.0f} ms",
        )
    console.print(table)
    for result in results:
        if result.error:
            console.print(f"  {result.scenario.checkout.order_id}: [dim]{result.error}[/dim]")
    unexpected = [r for r in results if not r.as_expected]
    if unexpected:
        console.print(f"[red]{len(unexpected)} checkout(s) ended unexpectedly[/red]")
        return 1
    console.print(
        f"\nAll {len(results)} checkouts ended as expected; nothing is left placed, charged or "
        "held for the ones compensated."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
