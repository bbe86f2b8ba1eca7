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


@app.command()
def migrate(
    url: str = typer.Option(..., envvar="SAGAS_DATABASE_URL", help="Database URL."),
    revision: str = typer.Option("head", help="Target revision."),
    table_prefix: str = typer.Option("sagas_", envvar="SAGAS_TABLE_PREFIX"),
) -> None:
    """Migrate the sagas tables (PostgreSQL or SQLite) to REVISION."""
    try:
        from sagas_sqlalchemy.migrate import upgrade  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    upgrade(url, revision, table_prefix=table_prefix)
    typer.echo(f"sagas tables migrated to {revision}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def participant(ctx: typer.Context, target: str) -> None:
    """Run participants (module:attribute) as their own process over RabbitMQ."""
    try:
        host = importlib.import_module("sagas_rabbitmq.host")
    except ImportError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(host.main([target, *ctx.args]))


def main() -> None:
    """Entry point of the ``sagas`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
