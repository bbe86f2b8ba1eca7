"""The ``sagas`` command line: run workers and participants, inspect and repair sagas."""

from __future__ import annotations

import asyncio
import getpass
import json
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sagas_abstractions import SagaError, SagaStatus
from sagas_core import __version__, plugins
from sagas_core.clock import SystemClock
from sagas_core.embedded import close_store
from sagas_core.host import SagaHost, load_host, open_settings_store
from sagas_core.orchestrator import Orchestrator
from sagas_core.runtime import run_event_loop, tune_gc
from sagas_core.settings import SagasSettings, SettingsError, load_settings
from sagas_core.telemetry import configure_from_env
from sagas_core.worker import configure_logging, run_worker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime

    from sagas_abstractions import HistoryEntry, SagaInstance, SagaRepository

app = typer.Typer(
    name="sagas",
    help="Durable saga orchestration: run workers, inspect and repair sagas.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


errors = Console(stderr=True)

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

APP_HELP = "The host, as module:attribute (like uvicorn's module:app). Env: SAGAS_APP."
DB_HELP = "Database URL (default: SAGAS_DATABASE_URL, else the embedded SQLite file)."


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h`` or ``1d`` as a timedelta."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"expected a duration like 90s, 10m, 2h or 1d; got {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def _load(target: str) -> SagaHost:
    try:
        return load_host(target)
    except SettingsError as exc:
        raise _fail(str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise _fail(f"cannot load the host {target!r}: {exc}") from exc


def _settings(target: str | None, database_url: str | None) -> SagasSettings:
    try:
        settings = _load(target).settings if target else load_settings()
        if database_url:
            settings = load_settings(**{**settings.model_dump(), "database_url": database_url})
    except SettingsError as exc:
        raise _fail(str(exc)) from exc
    return settings


async def _with_store(
    settings: SagasSettings, action: Callable[[SagaRepository], Awaitable[T]]
) -> T:
    store = await open_settings_store(settings)
    try:
        return await action(store)
    finally:
        await close_store(store)


def _run(coroutine: Awaitable[T]) -> T:
    try:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    except SagaError as exc:
        raise _fail(str(exc), 1) from exc
    except ImportError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def version() -> None:
    """Print the installed version of sagas."""
    typer.echo(__version__)


@app.command()
def worker(
    target: str = typer.Argument(..., help=APP_HELP, envvar="SAGAS_APP"),
    concurrency: int | None = typer.Option(None, min=1, help="Messages handled at once."),
    prefetch: int | None = typer.Option(None, min=1, help="Messages the broker sends ahead."),
    graceful_timeout: float | None = typer.Option(
        None, min=0.1, help="Seconds to finish in-flight work at shutdown."
    ),
    health_port: int | None = typer.Option(
        None, min=1, max=65535, help="Serve /health and /ready on 127.0.0.1:PORT."
    ),
    log_level: str | None = typer.Option(None, help="DEBUG, INFO, WARNING, ERROR."),
    log_format: str | None = typer.Option(None, help="text or json (one object a line)."),
) -> None:
    """Run the host's sagas and participants until SIGTERM/SIGINT."""
    overrides = {
        "concurrency": concurrency,
        "prefetch": prefetch,
        "graceful_timeout": graceful_timeout,
        "health_port": health_port,
        "log_level": log_level,
        "log_format": log_format,
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    host = _load(target)
    try:
        host.settings = load_settings(**{**host.settings.model_dump(), **given})
    except SettingsError as exc:
        raise _fail(str(exc)) from exc
    configure_logging(host.settings.log_level, host.settings.log_format)
    configure_from_env("sagas-worker")  # the standard OTEL_* variables, when they are set
    if host.settings.tune_gc:
        tune_gc()  # after the host's imports: a long-running process (docs/performance.md)
    raise typer.Exit(run_event_loop(run_worker(host)))  # on uvloop when installed


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def participant(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="Participants as module:attribute."),
    transport: str = typer.Option(
        "rabbitmq", help="The transport plugin, by name (entry-point group sagas.transports)."
    ),
) -> None:
    """Run participants (module:attribute) as their own process over RabbitMQ.

    Options, after the target: --url, --prefix, --concurrency, --group, --delivery-limit, --classic.

    Defaults from SAGAS_AMQP_URL and SAGAS_RABBITMQ_PREFIX. Prints "ready"; SIGTERM drains.
    """
    try:
        plugin = plugins.transport_named(transport)
    except ImportError as exc:
        raise _fail(str(exc)) from exc
    raise typer.Exit(plugin.run_participants([target, *ctx.args]))


@app.command()
def migrate(
    url: str = typer.Option(..., envvar="SAGAS_DATABASE_URL", help="Database URL."),
    revision: str = typer.Option("head", help="Target revision."),
    table_prefix: str = typer.Option("sagas_", envvar="SAGAS_TABLE_PREFIX"),
    check: bool = typer.Option(
        False,
        "--check",
        help="Migrate nothing: compare the tables with this version's schema; exit 1 on drift.",
    ),
) -> None:
    """Migrate the sagas tables (PostgreSQL or SQLite) to REVISION, or check them."""
    try:
        store = plugins.store_for(url)
    except (ImportError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    if check:
        drift = getattr(store, "drift", None)
        if drift is None:
            raise _fail(f"the {store.name!r} store cannot compare its schema (no drift())")
        differences: list[str] = drift(url, table_prefix=table_prefix)
        for line in differences:
            typer.echo(line)
        if differences:
            raise _fail(
                f"{len(differences)} difference(s) between the {table_prefix}* tables and this "
                "version's schema: run `sagas migrate`, or look for hand edits",
                code=1,
            )
        typer.echo(f"the {table_prefix}* tables match this version's schema")
        return
    store.upgrade(url, revision, table_prefix=table_prefix)
    typer.echo(f"sagas tables migrated to {revision}")


def _status_table(sagas: list[SagaInstance], title: str) -> Table:
    table = Table(title=title)
    table.add_column("saga id", overflow="fold", min_width=32)  # ids are copied: never cut
    for column in ("type", "status", "step", "attempt", "updated", "error"):
        table.add_column(column)
    for saga in sagas:
        table.add_row(
            saga.saga_id,
            saga.saga_type,
            saga.status.value,
            saga.current_step_name or "-",
            str(saga.attempt),
            saga.updated_at.isoformat(timespec="seconds"),
            "" if saga.error is None else f"{saga.error.code}: {saga.error.message}"[:60],
        )
    return table


@app.command("list")
def list_sagas(
    status: SagaStatus | None = typer.Option(None, help="Only sagas in this status."),
    saga_type: str | None = typer.Option(None, "--type", help="Only sagas of this type."),
    stuck_for: str | None = typer.Option(
        None, help="Only active sagas that have not moved for this long (90s, 10m, 2h)."
    ),
    limit: int = typer.Option(50, min=1, max=10_000),
    app_target: str | None = typer.Option(None, "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of sagas, for scripts."),
) -> None:
    """List sagas, least recently updated first (--stuck-for finds the ones that hang)."""
    settings = _settings(app_target, database_url)
    threshold = parse_duration(stuck_for) if stuck_for else None

    async def query(store: SagaRepository) -> list[SagaInstance]:
        before = None if threshold is None else SystemClock().now() - threshold
        statuses = (
            [status]
            if status
            else ([SagaStatus.RUNNING, SagaStatus.COMPENSATING] if threshold else [None])
        )
        found: list[SagaInstance] = []
        for wanted in statuses:
            found += await store.find(
                status=wanted, saga_type=saga_type, updated_before=before, limit=limit
            )
        return sorted(found, key=lambda s: s.updated_at)[:limit]

    sagas = _run(_with_store(settings, query))
    if as_json:
        typer.echo(json.dumps([_shown(saga) for saga in sagas]))
        return
    title = f"sagas not moved for {stuck_for}" if stuck_for else "sagas"
    console.print(_status_table(sagas, f"{title} ({len(sagas)})"))


def _shown(saga: SagaInstance) -> dict[str, object]:
    """The saga as JSON for a terminal: reply tokens are secrets and stay out."""
    return saga.model_dump(mode="json", exclude={"steps": {"__all__": {"reply_token"}}})


@app.command()
def show(
    saga_id: str,
    app_target: str | None = typer.Option(None, "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object (the saga and its history), for scripts."
    ),
) -> None:
    """Show one saga: status, steps, data and its full history."""
    settings = _settings(app_target, database_url)

    async def query(store: SagaRepository) -> tuple[SagaInstance | None, list[HistoryEntry]]:
        return await store.get(saga_id), await store.history(saga_id)

    saga, history = _run(_with_store(settings, query))
    if saga is None:
        raise _fail(f"no saga with id {saga_id!r}", 1)
    if as_json:
        document = {
            "saga": _shown(saga),
            "history": [entry.model_dump(mode="json") for entry in history],
        }
        typer.echo(json.dumps(document))
        return
    console.print(_status_table([saga], f"saga {saga_id}"))
    steps = Table(title="steps")
    for column in ("step", "status", "attempts", "compensation attempts", "error"):
        steps.add_column(column)
    for step in saga.steps:
        steps.add_row(
            step.name,
            step.status.value,
            str(step.attempts),
            str(step.compensation_attempts),
            "" if step.error is None else f"{step.error.code}: {step.error.message}"[:60],
        )
    console.print(steps)
    console.print_json(data=saga.data)
    trail = Table(title="history")
    for column in ("version", "at", "input", "outcome", "from", "to", "step", "reason", "actor"):
        trail.add_column(column)
    for entry in history:
        trail.add_row(
            str(entry.version),
            entry.at.isoformat(timespec="milliseconds"),
            entry.input,
            entry.outcome,
            str(entry.from_status or "-"),
            str(entry.to_status),
            entry.step or "-",
            (entry.reason or "")[:50],
            entry.actor or "",
        )
    console.print(trail)


def _operate(
    target: str,
    database_url: str | None,
    action: Callable[[Orchestrator], Awaitable[SagaInstance]],
) -> SagaInstance:
    host = _load(target)
    settings = _settings(None, database_url) if database_url else host.settings
    configure_from_env("sagas-cli")  # operator actions are spans of the saga's trace too

    async def apply(store: SagaRepository) -> SagaInstance:
        orchestrator = Orchestrator(
            store=store, definitions=host.sagas, clock=SystemClock(), group=settings.group
        )
        return await action(orchestrator)

    return _run(_with_store(settings, apply))


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@app.command()
def retry(
    saga_id: str,
    reason: str = typer.Option("", help="Why, for the history."),
    actor: str | None = typer.Option(None, help="Who (default: cli:<user>)."),
    app_target: str = typer.Option(..., "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Retry the failed compensation of a parked saga (a fresh round of attempts)."""
    saga = _operate(
        app_target,
        database_url,
        lambda o: o.retry_compensation(saga_id, actor=_actor(actor), reason=reason),
    )
    console.print(f"saga {saga_id} is {saga.status.value}: compensation retried")


@app.command()
def resolve(
    saga_id: str,
    note: str = typer.Option(..., help="What was done by hand (kept in the history)."),
    actor: str | None = typer.Option(None, help="Who (default: cli:<user>)."),
    app_target: str = typer.Option(..., "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Close a parked (failed) saga by hand, with a note."""
    saga = _operate(
        app_target, database_url, lambda o: o.resolve(saga_id, actor=_actor(actor), note=note)
    )
    console.print(f"saga {saga_id} is {saga.status.value}")


@app.command()
def compensate(
    saga_id: str,
    reason: str = typer.Option("", help="Why, for the history."),
    actor: str | None = typer.Option(None, help="Who (default: cli:<user>)."),
    app_target: str = typer.Option(..., "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Stop a running saga and compensate what it has done."""
    saga = _operate(
        app_target,
        database_url,
        lambda o: o.compensate(saga_id, actor=_actor(actor), reason=reason),
    )
    console.print(f"saga {saga_id} is {saga.status.value}")


@runtime_checkable
class _Prunable(Protocol):
    async def prune_inbox(self, older_than: datetime) -> int: ...
    async def prune_outbox(self, sent_before: datetime) -> int: ...


@app.command()
def prune(
    older_than: str = typer.Option(
        "7d",
        help="Delete inbox rows and published outbox rows older than this (90s, 10m, 2h, 7d). "
        "Keep at least the broker's redelivery window.",
    ),
    app_target: str | None = typer.Option(None, "--app", help=APP_HELP, envvar="SAGAS_APP"),
    database_url: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Delete old deduplication (inbox) and published outbox rows; run it daily (cron)."""
    settings = _settings(app_target, database_url)
    cutoff = SystemClock().now() - parse_duration(older_than)

    async def apply(store: SagaRepository) -> tuple[int, int]:
        if not isinstance(store, _Prunable):
            raise _fail(f"{type(store).__name__} keeps nothing to prune")
        return await store.prune_inbox(cutoff), await store.prune_outbox(cutoff)

    inbox, outbox = _run(_with_store(settings, apply))
    console.print(f"pruned {inbox} inbox and {outbox} outbox row(s) older than {older_than}")


def main() -> None:
    """Entry point of the ``sagas`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
