"""``python -m samples.order_processing``: run the demo batch and print a table."""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console
from rich.table import Table

from sagas_abstractions import SagaStatus
from samples.order_processing.demo import run_demo
from samples.order_processing.saga import order_saga

_STYLE = {
    SagaStatus.COMPLETED: "green",
    SagaStatus.COMPENSATED: "yellow",
    SagaStatus.FAILED: "red",
}


def main() -> int:
    """Run the demo; exit status 1 if any order ended differently than its scenario expects."""
    console = Console(width=max(Console().width, 110))
    console.print(
        "[bold]sagas[/bold] order-processing demo: embedded runtime "
        "(in-memory state and bus, participants in this process)\n"
    )
    results, _ = asyncio.run(run_demo())
    table = Table(title="Order sagas", show_lines=False)
    for column in ("order", "scenario", "final status", "steps done", "compensations run", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for result in results:
        style = _STYLE.get(result.status, "")
        mark = "" if result.as_expected else " [red](unexpected)[/red]"
        table.add_row(
            result.scenario.order.order_id,
            result.scenario.name,
            f"[{style}]{result.status.value}[/{style}]{mark}",
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
    console.print(f"\nAll {len(results)} orders ended as expected.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
