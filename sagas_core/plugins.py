"""How the core finds its adapters: entry points, or registration by the host application.

The core imports no adapter. A transport or a store is a *plugin*: a small object that says which
URL schemes it serves and does what the core needs of it (:class:`TransportPlugin`,
:class:`StorePlugin`). The core finds one the way SQLAlchemy finds dialects or pytest finds
plugins:

1. plugins the host application registered (:func:`register_transport`,
   :func:`register_store`), the most recently registered first;
2. the entry points of the installed distributions, in the groups ``sagas.transports`` and
   ``sagas.stores`` (``sagas`` itself declares ``rabbitmq`` and ``sqlalchemy``).

A plugin serves a URL when its ``schemes`` hold the URL's scheme (``postgresql+asyncpg``) or the
part before the ``+`` (``postgresql``).

An entry point is loaded only when a plugin of its group is looked for, so importing
``sagas_core`` loads no broker client and no database toolkit. An entry point that cannot be
imported (its extra is not installed) is skipped; when nothing else serves the URL, the lookup
raises :class:`PluginNotFound` with that entry point's own install hint.

Example:
    ```toml
    # pyproject.toml of a third-party store
    [project.entry-points."sagas.stores"]
    mongodb = "sagas_mongodb.plugin:store"
    ```

    or, without packaging it, in the host application:

    ```python
    from sagas_core.plugins import register_store

    register_store(MongoStorePlugin())
    ```
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence

    from sagas_abstractions import MessageBus, SagaRepository
    from sagas_core.settings import SagasSettings

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/unit/test_public_api.py pins it
    "PluginNotFound",
    "STORES_GROUP",
    "StorePlugin",
    "TRANSPORTS_GROUP",
    "TransportPlugin",
    "register_store",
    "register_transport",
    "store_for",
    "transport_for",
    "transport_named",
    "unregister_store",
    "unregister_transport",
]

_log = logging.getLogger("sagas.plugins")

TRANSPORTS_GROUP = "sagas.transports"
"""The entry-point group of transports (:class:`TransportPlugin` objects)."""

STORES_GROUP = "sagas.stores"
"""The entry-point group of state stores (:class:`StorePlugin` objects)."""


@runtime_checkable
class TransportPlugin(Protocol):
    """A message transport, as the core uses it: a bus for the host, and the participant host.

    Declare it in the ``sagas.transports`` entry-point group, or register it with
    :func:`register_transport`.
    """

    @property
    def name(self) -> str:
        """A short name (``rabbitmq``); ``sagas participant --transport NAME`` picks it."""
        ...

    @property
    def schemes(self) -> Collection[str]:
        """The URL schemes it serves (``amqp``, ``amqps``)."""
        ...

    async def connect(self, url: str, settings: SagasSettings) -> MessageBus:
        """A connected bus at ``url``, configured from the host's settings.

        The host closes it (``await bus.close()``) when it stops.
        """
        ...

    def run_participants(self, argv: Sequence[str]) -> int:
        """Run participants as a process of their own: what ``sagas participant`` does.

        Args:
            argv: The target (``module:attribute``) and the transport's own options.

        Returns:
            The process exit status.
        """
        ...


@runtime_checkable
class StorePlugin(Protocol):
    """A state store, as the core uses it: open one from a URL, migrate its schema.

    Declare it in the ``sagas.stores`` entry-point group, or register it with
    :func:`register_store`.
    """

    @property
    def name(self) -> str:
        """A short name (``sqlalchemy``)."""
        ...

    @property
    def schemes(self) -> Collection[str]:
        """The URL schemes it serves (``postgresql``, ``sqlite``, or a full ``backend+driver``)."""
        ...

    async def open_store(
        self, url: str, *, migrate: bool | None = None, **options: Any
    ) -> SagaRepository:
        """A store at ``url`` that has answered once (a bad URL fails here, not mid-saga).

        Args:
            url: The database URL.
            migrate: Migrate to the latest schema now; ``None`` leaves it to the store (the SQL
                store migrates SQLite only).
            **options: Store options (``table_prefix``, ``slow_statement_seconds``, ...).

        The caller releases it with ``await store.close()`` when the store has a ``close``.
        """
        ...

    def upgrade(self, url: str, revision: str, *, table_prefix: str) -> None:
        """Migrate the schema at ``url`` to ``revision`` (blocking): what ``sagas migrate`` does."""
        ...


P = TypeVar("P", TransportPlugin, StorePlugin)


class PluginNotFound(ImportError):  # noqa: N818 - an ImportError, caught as one today
    """No registered or installed plugin serves what was asked for.

    When an entry point that might have served it could not be imported (its extra is not
    installed), the message is that entry point's own error, with its install hint.

    Attributes:
        group: The entry-point group looked in.
        wanted: The scheme or name asked for.
        available: The names of the plugins that were found (none of them serves it).
        load_errors: Why entry points of the group could not be imported.
    """

    def __init__(
        self,
        message: str,
        *,
        group: str,
        wanted: str,
        available: tuple[str, ...],
        load_errors: tuple[ImportError, ...],
    ) -> None:
        super().__init__(message)
        self.group = group
        self.wanted = wanted
        self.available = available
        self.load_errors = load_errors

    @property
    def not_installed(self) -> bool:
        """Whether the plugin is probably just missing (nothing loaded, or an import failed)."""
        return bool(self.load_errors) or not self.available


def _load(point: EntryPoint) -> object:
    """The entry point's object, its packages imported first, as a first import does.

    Loaded at each lookup (dictionary hits once imported), so a package made unimportable
    since (``sys.modules[name] = None``, as when an extra is absent) is honoured: a loaded
    submodule alone would not show it.
    """
    parts = point.module.split(".")
    for depth in range(1, len(parts) + 1):
        importlib.import_module(".".join(parts[:depth]))
    return point.load()


class _Kind(Generic[P]):
    """The plugins of one entry-point group."""

    def __init__(self, group: str, protocol: type, noun: str, install: str) -> None:
        self.group = group
        self.protocol: type = protocol  # P itself: a protocol class is not a concrete type[P]
        self.noun = noun
        self.install = install
        self.registered: list[P] = []

    def register(self, plugin: P) -> None:
        self._check(plugin, "registered plugin")
        if plugin in self.registered:
            self.registered.remove(plugin)
        self.registered.append(plugin)

    def unregister(self, plugin: P) -> None:
        if plugin in self.registered:
            self.registered.remove(plugin)

    def _check(self, plugin: object, origin: str) -> None:
        if not isinstance(plugin, self.protocol):
            raise TypeError(
                f"{origin} {plugin!r} is not a {self.protocol.__name__} "
                f"(entry-point group {self.group!r})"
            )

    def _candidates(self, name: str | None, errors: list[ImportError]) -> Iterator[P]:
        yield from reversed(self.registered)
        for point in entry_points(group=self.group):
            if name is not None and point.name != name:
                continue
            try:
                plugin = _load(point)
            except ImportError as exc:
                _log.debug("entry point %s in %s cannot be imported: %s", point, self.group, exc)
                errors.append(exc)
                continue
            self._check(plugin, f"entry point {point.name} = {point.value!r}:")
            yield cast("P", plugin)

    def find(self, wanted: str, matches: Callable[[P], bool], *, name: str | None = None) -> P:
        errors: list[ImportError] = []
        seen: list[str] = []
        for plugin in self._candidates(name, errors):
            if matches(plugin):
                return plugin
            seen.append(plugin.name)
        if errors:
            message = str(errors[0])
        elif seen:
            message = (
                f"no {self.noun} serves {wanted!r} (found: {', '.join(seen)}); install one that "
                f"does, or register it with sagas_core.plugins.register_{self.noun}"
            )
        else:
            message = (
                f"no {self.noun} for {wanted!r} is installed or registered (entry-point group "
                f"{self.group!r}); {self.install}"
            )
        raise PluginNotFound(
            message,
            group=self.group,
            wanted=wanted,
            available=tuple(seen),
            load_errors=tuple(errors),
        )


_TRANSPORTS: _Kind[TransportPlugin] = _Kind(
    TRANSPORTS_GROUP,
    TransportPlugin,
    "transport",
    "for RabbitMQ: pip install 'sagas-orchestrator[rabbitmq]'",
)
_STORES: _Kind[StorePlugin] = _Kind(
    STORES_GROUP, StorePlugin, "store", "for SQL: pip install 'sagas-orchestrator[sqlalchemy]'"
)


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ValueError(
            f"expected a URL with a scheme (like amqp:// or postgresql://), got {url!r}"
        )
    return scheme


def _serves(scheme: str) -> Callable[[TransportPlugin | StorePlugin], bool]:
    base = scheme.partition("+")[0]

    def serves(plugin: TransportPlugin | StorePlugin) -> bool:
        schemes = {served.lower() for served in plugin.schemes}
        return scheme in schemes or base in schemes

    return serves


def register_transport(plugin: TransportPlugin) -> None:
    """Make ``plugin`` available to the core, ahead of every installed transport.

    For a transport that is not installed as a distribution, or to replace one in tests.

    Raises:
        TypeError: ``plugin`` is not a :class:`TransportPlugin`.
    """
    _TRANSPORTS.register(plugin)


def unregister_transport(plugin: TransportPlugin) -> None:
    """Forget a plugin given to :func:`register_transport` (nothing if it was not)."""
    _TRANSPORTS.unregister(plugin)


def register_store(plugin: StorePlugin) -> None:
    """Make ``plugin`` available to the core, ahead of every installed store.

    For a store that is not installed as a distribution, or to replace one in tests.

    Raises:
        TypeError: ``plugin`` is not a :class:`StorePlugin`.
    """
    _STORES.register(plugin)


def unregister_store(plugin: StorePlugin) -> None:
    """Forget a plugin given to :func:`register_store` (nothing if it was not)."""
    _STORES.unregister(plugin)


def transport_for(url: str) -> TransportPlugin:
    """The transport that serves ``url``'s scheme.

    Raises:
        PluginNotFound: None does (the message says what to install).
        ValueError: ``url`` has no scheme.
    """
    scheme = _scheme(url)
    return _TRANSPORTS.find(f"{scheme}://", _serves(scheme))


def transport_named(name: str) -> TransportPlugin:
    """The transport called ``name`` (``rabbitmq``).

    Raises:
        PluginNotFound: There is none (the message says what to install).
    """
    return _TRANSPORTS.find(name, lambda plugin: plugin.name == name, name=name)


def store_for(url: str) -> StorePlugin:
    """The store that serves ``url``'s scheme.

    Raises:
        PluginNotFound: None does (the message says what to install).
        ValueError: ``url`` has no scheme.
    """
    scheme = _scheme(url)
    return _STORES.find(f"{scheme}://", _serves(scheme))
