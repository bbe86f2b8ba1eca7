"""The host: sagas, participants, transports, stores and dependencies, wired once.

Example:
    ```python
    host = (
        SagaHost.builder()
        .use_rabbitmq("amqp://guest:guest@localhost:5672/")
        .use_sqlalchemy("postgresql+psycopg://app@localhost/app")
        .add_saga(order_saga)
        .provide(StockService, factory=make_stock_service)
        .build()
    )
    ```

``sagas worker module:host`` runs it. Without a database URL the state lives in the embedded
SQLite file (``SAGAS_SQLITE_PATH``, default ``.sagas/sagas.sqlite3``); without a broker URL the
bus is in-process, so participants must be registered on the host too.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sagas_abstractions import SagaError
from sagas_core import embedded, plugins
from sagas_core.circuit import CircuitBreaker
from sagas_core.di import Dependencies, DependencyScope, Factory, Resolver, ScopedResolver
from sagas_core.memory.bus import InMemoryBus
from sagas_core.memory.store import InMemorySagaStore
from sagas_core.runtime import SagaRuntime
from sagas_core.settings import SagasSettings, load_settings, redact_url

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncIterator, Callable, Mapping
    from datetime import datetime
    from types import TracebackType

    from pydantic import BaseModel

    from sagas_abstractions import (
        HistoryEntry,
        MessageBus,
        SagaInstance,
        SagaRepository,
        SagaStatus,
    )
    from sagas_core.definition import SagaDefinition
    from sagas_core.participant import Participant
    from sagas_core.telemetry import Telemetry

__all__ = [
    "HostNotStarted",
    "SagaHost",
    "SagaHostBuilder",
    "import_target",
    "load_host",
    "open_settings_store",
]

_log = logging.getLogger("sagas.host")

T = TypeVar("T")


class HostNotStarted(SagaError):  # noqa: N818 - reads as a sentence
    """The host was used before ``start()`` (or after ``stop()``)."""


class SagaHostBuilder:
    """Collects what a host runs; :meth:`build` makes the :class:`SagaHost`."""

    def __init__(self) -> None:
        self._settings: SagasSettings | None = None
        self._overrides: dict[str, object] = {}
        self._sagas: list[SagaDefinition] = []
        self._participants: list[Participant] = []
        self._dependencies: Resolver | ScopedResolver = Dependencies()
        self._store: SagaRepository | None = None
        self._bus: MessageBus | None = None
        self._memory_store = False
        self._telemetry: Telemetry | None = None

    def use_settings(self, settings: SagasSettings) -> Self:
        """Use these settings instead of reading ``SAGAS_*`` variables at build time."""
        self._settings = settings
        return self

    def configure(self, **overrides: object) -> Self:
        """Override single settings (``concurrency=32``), validated at build time."""
        self._overrides.update(overrides)
        return self

    def use_rabbitmq(self, url: str | None = None, **options: object) -> Self:
        """Use RabbitMQ at ``url`` (default: ``SAGAS_AMQP_URL``).

        ``options`` are settings such as ``rabbitmq_prefix`` or ``delivery_limit``.
        """
        if url is not None:
            self._overrides["amqp_url"] = url
        self._overrides.update(options)
        return self

    def use_sqlalchemy(self, url: str | None = None, **options: object) -> Self:
        """Keep state in the database at ``url``.

        Default: ``SAGAS_DATABASE_URL``, else the embedded SQLite file. ``options`` are settings
        such as ``table_prefix``.
        """
        if url is not None:
            self._overrides["database_url"] = url
        self._overrides.update(options)
        return self

    def use_memory(self) -> Self:
        """Keep state in process memory (tests, demos): nothing survives a restart."""
        self._memory_store = True
        return self

    def use_store(self, store: SagaRepository) -> Self:
        """Use this store instance (the host does not close it)."""
        self._store = store
        return self

    def use_bus(self, bus: MessageBus) -> Self:
        """Use this bus instance (the host does not close it)."""
        self._bus = bus
        return self

    def use_telemetry(self, telemetry: Telemetry) -> Self:
        """Trace and measure with these providers instead of the global ones.

        Example:
            ```python
            builder.use_telemetry(Telemetry(tracer_provider=provider, meter_provider=meters))
            ```
        """
        self._telemetry = telemetry
        return self

    def add_saga(self, definition: SagaDefinition) -> Self:
        """Run this saga."""
        self._sagas.append(definition)
        return self

    def add_participant(self, participant: Participant) -> Self:
        """Host this participant in the worker.

        It gets the host's dependencies when it has none of its own.
        """
        self._participants.append(participant)
        return self

    def provide(
        self,
        dependency: type[T],
        instance: T | None = None,
        *,
        factory: Factory[T] | None = None,
        scope: DependencyScope = "singleton",
    ) -> Self:
        """Make ``dependency`` injectable into local steps and hosted participants.

        See :meth:`Dependencies.provide <sagas_core.di.Dependencies.provide>`: an instance, a
        factory called once, or (``scope="message"``) a factory called per handled command.

        Raises:
            TypeError: :meth:`use_dependencies` set a resolver other than ``Dependencies``
                (register the dependency in that container instead).
        """
        if not isinstance(self._dependencies, Dependencies):
            raise TypeError(
                f"provide({dependency!r}): the host uses {type(self._dependencies).__name__}; "
                "register the dependency in that container instead"
            )
        self._dependencies.provide(dependency, instance, factory=factory, scope=scope)
        return self

    def use_dependencies(self, resolver: Resolver | ScopedResolver) -> Self:
        """Resolve local step and participant parameters with ``resolver`` (a DI container).

        Example:
            ```python
            container = make_async_container(AppProvider())
            builder.use_dependencies(DishkaResolver(container))
            ```
        """
        self._dependencies = resolver
        return self

    def build(self) -> SagaHost:
        """Validate the settings and return the host (nothing connects until ``start()``).

        Raises:
            SettingsError: a setting is wrong (the message names the variable).
            ValueError: no saga was added.
        """
        if not self._sagas and not self._participants:
            raise ValueError("a host needs at least one saga or participant: call add_saga()")
        if self._settings is not None:
            settings = self._settings.model_copy(update=self._overrides)
        else:
            settings = load_settings(**self._overrides)
        return SagaHost(
            settings=settings,
            sagas=tuple(self._sagas),
            participants=tuple(self._participants),
            dependencies=self._dependencies,
            store=self._store if self._store is not None else None,
            bus=self._bus,
            memory_store=self._memory_store,
            telemetry=self._telemetry,
        )


class SagaHost:
    """A built host: ``start()``/``stop()`` or ``async with host:``, then use its saga API.

    Build one with :meth:`SagaHost.builder`.
    """

    def __init__(
        self,
        *,
        settings: SagasSettings,
        sagas: tuple[SagaDefinition, ...],
        participants: tuple[Participant, ...] = (),
        dependencies: Resolver | ScopedResolver | None = None,
        store: SagaRepository | None = None,
        bus: MessageBus | None = None,
        memory_store: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.sagas = sagas
        self.participants = participants
        self.dependencies: Resolver | ScopedResolver = (
            dependencies if dependencies is not None else Dependencies()
        )
        self._given_store = store
        self._given_bus = bus
        self._memory_store = memory_store
        self._runtime: SagaRuntime | None = None
        self._closers: list[Callable[[], Any]] = []

    @staticmethod
    def builder() -> SagaHostBuilder:
        """A new, empty builder."""
        return SagaHostBuilder()

    # ------------------------------------------------------------------ lifecycle

    @property
    def runtime(self) -> SagaRuntime:
        """The running runtime.

        Raises:
            HostNotStarted: before ``start()``.
        """
        if self._runtime is None:
            raise HostNotStarted("the host is not started: await host.start() first")
        return self._runtime

    @property
    def started(self) -> bool:
        """Whether the host runs."""
        return self._runtime is not None

    async def start(self) -> None:
        """Open the store and the bus, then start consuming and the background services."""
        if self._runtime is not None:
            return
        store = await self._open_store()
        try:
            bus = await self._open_bus()
        except BaseException:
            await self._close_all()
            raise
        for participant in self.participants:
            own = participant.dependencies
            if isinstance(own, Dependencies) and len(own) == 0:
                participant.dependencies = self.dependencies
        runtime = SagaRuntime(
            sagas=self.sagas,
            participants=self.participants,
            store=store,
            bus=bus,
            dependencies=self.dependencies,
            group=self.settings.group,
            concurrency=self.settings.concurrency,
            timeout_interval=self.settings.timeout_interval,
            timeout_idle_interval=self.settings.timeout_idle_interval,
            breaker=self._breaker(),
            telemetry=self.telemetry,
            status_events=self.settings.status_events,
            max_message_bytes=self.settings.max_message_bytes,
            max_data_bytes=self.settings.max_saga_data_bytes,
            reply_users=self.settings.reply_users,
        )
        try:
            await runtime.start()
        except BaseException:
            await self._close_all()
            raise
        self._runtime = runtime
        _log.info(
            "host started",
            extra={
                "sagas": [s.name for s in self.sagas],
                "store": type(store).__name__,
                "bus": type(bus).__name__,
                "database_url": redact_url(self.settings.database_url),
                "amqp_url": redact_url(self.settings.amqp_url),
            },
        )

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop consuming, finish in-flight work, flush the outbox (bounded), close everything."""
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.stop(grace=self.settings.graceful_timeout if grace is None else grace)
        await self._close_all()

    async def _close_all(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - closing one resource must not stop the others
                _log.exception("closing a host resource failed")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """An ASGI lifespan (FastAPI, Starlette): the host runs while the web app does.

        Example:
            ```python
            app = FastAPI(lifespan=host.lifespan)
            ```
        """
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _open_store(self) -> SagaRepository:
        if self._given_store is not None:
            return self._given_store
        if self._memory_store:
            return InMemorySagaStore()
        store = await open_settings_store(self.settings)
        self._closers.append(lambda: embedded.close_store(store))
        return store

    async def _open_bus(self) -> MessageBus:
        if self._given_bus is not None:
            return self._given_bus
        if self.settings.amqp_url is None:
            bus = InMemoryBus(
                max_deliveries=self.settings.delivery_limit + 1, keep_published=10_000
            )
            self._closers.append(bus.close)
            return bus
        try:
            transport = plugins.transport_for(self.settings.amqp_url)
        except ImportError as exc:
            raise ImportError(
                "SAGAS_AMQP_URL is set but the RabbitMQ transport is missing: "
                "pip install 'sagas-orchestrator[rabbitmq]'"
            ) from exc
        connected = await transport.connect(self.settings.amqp_url, self.settings)
        self._closers.append(connected.close)
        return connected

    def _breaker(self) -> CircuitBreaker | None:
        if self.settings.circuit_failures is None:
            return None
        return CircuitBreaker(
            failure_threshold=self.settings.circuit_failures,
            open_for=timedelta(seconds=self.settings.circuit_open_seconds),
        )

    async def ready(self) -> bool:
        """Whether the host can do its work: started, consumers registered, store answering."""
        if self._runtime is None:
            return False
        is_ready = getattr(self._runtime.bus, "is_ready", None)
        if is_ready is not None and not await is_ready():
            return False
        try:
            await self._runtime.store.pending_count()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    # ------------------------------------------------------------------ the saga API

    async def start_saga(
        self,
        saga: str | SagaDefinition,
        data: BaseModel | Mapping[str, Any],
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
    ) -> SagaInstance:
        """Start a saga (idempotent with an explicit ``saga_id``)."""
        return await self.runtime.start_saga(
            saga, data, saga_id=saga_id, correlation_id=correlation_id
        )

    async def get(self, saga_id: str) -> SagaInstance:
        """The saga with this id (raises ``SagaNotFound``)."""
        return await self.runtime.orchestrator.get(saga_id)

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Sagas matching every filter, least recently updated first."""
        return await self.runtime.orchestrator.list(
            status=status, saga_type=saga_type, updated_before=updated_before, limit=limit
        )

    async def history(self, saga_id: str) -> builtins.list[HistoryEntry]:
        """The saga's audit trail, oldest first."""
        return await self.runtime.orchestrator.history(saga_id)

    async def wait_for(self, saga_id: str, *, timeout: float = 30.0) -> SagaInstance:
        """Wait until the saga is terminal or failed."""
        return await self.runtime.wait_for(saga_id, timeout=timeout)


async def open_settings_store(settings: SagasSettings) -> SagaRepository:
    """Open the store the settings name (``database_url``, else the embedded SQLite file).

    SQLite is created and migrated on first use; a server database only with ``auto_migrate``.
    The database is asked once, so an unreachable one fails here. Close the store with
    :func:`sagas_core.close_store`.

    Raises:
        ImportError: the SQL store is not installed (with the install hint).
        StoreError: the database does not answer.
    """
    store = await embedded.open_store(
        settings.database_url,
        sqlite_path=settings.sqlite_path,
        migrate=True if settings.auto_migrate else None,
        table_prefix=settings.table_prefix,
        slow_statement_seconds=settings.slow_statement_seconds,
    )
    try:
        await store.pending_count()
    except BaseException:
        await embedded.close_store(store)
        raise
    return store


def import_target(target: str) -> object:
    """The object ``module:attribute`` names, importing the module (like ``uvicorn module:app``).

    The current directory is on the import path first, as with ``python -m``: a console script
    (``sagas worker``, ``sagas participant``) would not find ``shop.py`` beside it otherwise.

    Raises:
        ValueError: The target is malformed, its module cannot be imported, or it lacks the
            attribute.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'module:attribute', got {target!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot import {module_name!r}: {exc} (run from the directory that holds it, or "
            "set PYTHONPATH)"
        ) from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from exc


def load_host(target: str) -> SagaHost:
    """Import ``module:attribute``: a :class:`SagaHost`, a builder, or a function returning one.

    Like ``uvicorn module:app``.

    Raises:
        ValueError: the target is malformed or cannot be imported.
        TypeError: the target names something else.
    """
    value = import_target(target)
    if callable(value) and not isinstance(value, SagaHost | SagaHostBuilder):
        value = value()
    if isinstance(value, SagaHostBuilder):
        value = value.build()
    if not isinstance(value, SagaHost):
        raise TypeError(f"{target!r} is a {type(value).__name__}, not a SagaHost or its builder")
    return value
