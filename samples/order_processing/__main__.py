"""``python -m samples.order_processing``: run the demo batch and print a table.

Saga state lives in a SQLite file (``.sagas/sagas.sqlite3``, ``$SAGAS_SQLITE_PATH`` or
``--db PATH``), so a run killed mid-batch is finished by the next one; ``--memory`` keeps it in
memory instead.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from samples.demo_support import demo_parser, demo_store, describe_state, status_cell
from samples.order_processing.demo import OrderResult, run_demo
from samples.order_processing.saga import order_saga

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = demo_parser(
        "python -m samples.order_processing",
        "Run the order saga demo batch on the embedded runtime.",
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, console: Console) -> list[OrderResult]:
    def resumed(count: int) -> None:
        if count:
            console.print(f"Resuming {count} saga(s) left active by a previous run.\n")

    async with demo_store(args) as store:
        results, _ = await run_demo(store=store, on_resume=resumed)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 1 if any order ended differently than its scenario expects."""
    args = _arguments(argv)
    console = Console(width=max(Console().width, 110))
    state = describe_state(args)
    console.print(
        f"[bold]sagas[/bold] order-processing demo: embedded runtime "
        f"({state}, in-memory bus, participants in this process)\n"
    )
    results = asyncio.run(_run(args, console))
    table = Table(title="Order sagas", show_lines=False)
    for column in ("order", "scenario", "final status", "steps done", "compensations run", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for result in results:
        order = result.scenario.order.order_id
        table.add_row(
            f"{order} [cyan](resumed)[/cyan]" if result.resumed else order,
            result.scenario.name,
            status_cell(result.status, as_expected=result.as_expected, other="magenta"),
            f"{len(result.steps_done)}/{len(order_saga.steps)}",
            ", ".join(result.compensations) or "-",
            f"{result.seconds * 1000:.0f} ms",
        )
    console.print(table)
    for result in results:
        if result.error:
            console.print(f"  {result.scenario.order.order_id}: [dim]{result.error}[/dim]")
    unexpected = [r for r in results if not r.as_expected]
    if unexpected:
        console.print(f"[red]{len(unexpected)} order(s) ended unexpectedly[/red]")
        return 1
    resumed = sum(1 for r in results if r.resumed)
    also = f" ({resumed} resumed from a previous run)" if resumed else ""
    console.print(f"\nAll {len(results)} orders ended as expected{also}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
