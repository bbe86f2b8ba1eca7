"""``python -m samples.money_transfer``: run the transfers, print them and the books.

Saga state lives in a SQLite file (``.sagas/sagas.sqlite3``, ``$SAGAS_SQLITE_PATH`` or
``--db PATH``); ``--memory`` keeps it in memory instead. Transfers a killed run left in flight
are finished first.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from sagas_abstractions import SagaStatus
from samples.demo_support import demo_parser, demo_store, describe_state, status_cell
from samples.money_transfer.demo import TransferReport, finish_leftovers, run_demo

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = demo_parser(
        "python -m samples.money_transfer",
        "Run the money-transfer saga demo on the embedded runtime.",
    )
    parser.add_argument(
        "--storm", type=int, default=40, help="concurrent transfers to run (default 40)"
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, console: Console) -> TransferReport:
    async with demo_store(args) as store:
        resumed = await finish_leftovers(store)
        if resumed:
            console.print(f"Finished {resumed} transfer(s) a previous run left in flight.\n")
        return await run_demo(store=store, storm=args.storm)


def _transfers_table(report: TransferReport) -> Table:
    table = Table(title="Transfers")
    for column in ("transfer", "scenario", "from -> to", "amount", "final status", "undone"):
        table.add_column(column, justify="right" if column == "amount" else "left")
    for result in report.named:
        transfer = result.scenario.transfer
        table.add_row(
            transfer.transfer_id,
            result.scenario.name,
            f"{transfer.source_account[4:]} -> {transfer.destination_account[4:]}",
            f"{transfer.amount}",
            status_cell(result.status, as_expected=result.as_expected),
            ", ".join(result.compensated) or "-",
        )
    if report.storm:
        first, last = report.storm[0].scenario, report.storm[-1].scenario
        done = sum(1 for r in report.storm if r.status is SagaStatus.COMPLETED)
        refused = sum(1 for r in report.storm if r.status is SagaStatus.COMPENSATED)
        other = len(report.storm) - done - refused
        moved = sum(
            (r.scenario.transfer.amount for r in report.storm if r.status is SagaStatus.COMPLETED),
            start=0 * first.transfer.amount,
        )
        summary = f"[green]{done} completed[/green], [yellow]{refused} compensated[/yellow]"
        table.add_row(
            f"{first.transfer.transfer_id}..{last.transfer.transfer_id[4:]}",
            f"{len(report.storm)} at once (insufficient funds: compensated)",
            "ALICE <-> BOB <-> CAROL",
            f"{moved}",
            summary + (f", [red]{other} other (unexpected)[/red]" if other else ""),
            "-",
        )
    return table


def _accounts_table(report: TransferReport) -> Table:
    table = Table(title="Accounts")
    for column in ("account", "opening", "closing", "lowest ever"):
        table.add_column(column, justify="left" if column == "account" else "right")
    for account_id, account in report.bank.accounts.items():
        closed = "" if account.is_open else " [dim](closed)[/dim]"
        table.add_row(
            account_id + closed,
            f"{report.opening[account_id]}",
            f"{account.balance}",
            f"{account.lowest}",
        )
    table.add_row(
        "[bold]total[/bold]",
        f"{report.opening_total}",
        f"{report.bank.total}",
        "",
        end_section=True,
    )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 1 if a transfer ended unexpectedly or the books do not balance."""
    args = _arguments(argv)
    console = Console(width=max(Console().width, 110))
    state = describe_state(args)
    console.print(
        f"[bold]sagas[/bold] money-transfer demo: debit the source -> credit the destination "
        f"({state}, in-memory bus, the bank in this process)\n"
    )
    report = asyncio.run(_run(args, console))
    console.print(_transfers_table(report))
    for result in report.named:
        if result.error:
            console.print(f"  {result.scenario.transfer.transfer_id}: [dim]{result.error}[/dim]")
    console.print()
    console.print(_accounts_table(report))
    unchanged = report.bank.total == report.opening_total
    never_negative = report.bank.lowest_balance >= 0
    console.print(
        f"\nSum of all balances: {report.opening_total} before, {report.bank.total} after "
        f"({'unchanged' if unchanged else '[red]CHANGED[/red]'}); lowest balance ever: "
        f"{report.bank.lowest_balance} "
        f"({'never negative' if never_negative else '[red]NEGATIVE[/red]'}); "
        f"{len(report.bank.postings)} postings in {report.seconds:.1f}s."
    )
    if not report.ok:
        console.print("[red]The demo did not end as expected.[/red]")
        return 1
    total = len(report.named) + len(report.storm)
    console.print(f"All {total} transfers ended as expected and the books balance.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
