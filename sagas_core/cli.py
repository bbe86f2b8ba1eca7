"""The ``sagas`` command line."""

from __future__ import annotations

import importlib

import typer

from sagas_core import __version__

app = typer.Typer(
    name="sagas",
    help="Durable saga orchestration: run workers, inspect and repair sagas.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed version of sagas."""
    typer.echo(__version__)


@app.command()
def demo() -> None:
    """Run the order-processing sample (needs a checkout: the samples are not in the wheel)."""
    try:
        module = importlib.import_module("samples.order_processing.__main__")
    except ModuleNotFoundError as exc:
        typer.echo(
            f"the samples live in the source checkout: run this from the repository root ({exc})",
            err=True,
        )
        raise typer.Exit(2) from exc
    raise typer.Exit(module.main())


def main() -> None:
    """Entry point of the ``sagas`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
