"""Resolve handler and local step parameters from a dishka_ container.

APP-scoped providers are singletons; each handled command gets its own REQUEST scope, so a
REQUEST-scoped provider is created once per command and finalized when the command is done
(even when the handler raised). ``pip install 'sagas-orchestrator[dishka]'``.

Example:
    ```python
    class AppProvider(Provider):
        stock = provide(StockService, scope=Scope.APP)

        @provide(scope=Scope.REQUEST)
        async def session(self, engine: Engine) -> AsyncIterator[Session]:
            async with engine.session() as session:
                yield session

    container = make_async_container(AppProvider())
    host = SagaHost.builder().use_dependencies(DishkaResolver(container)).add_saga(saga).build()
    ```

The container is the caller's: close it (``await container.close()``) after the host stops.

.. _dishka: https://dishka.readthedocs.io
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any, TypeVar

from sagas_core.di import MessageScope, MissingDependency, dependency_name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import ModuleType

    from dishka import AsyncContainer, BaseScope

__all__ = ["INSTALL_DISHKA", "DishkaResolver"]

T = TypeVar("T")

INSTALL_DISHKA = "the dishka adapter needs dishka: pip install 'sagas-orchestrator[dishka]'"


def _dishka(module: str = "dishka") -> ModuleType:
    # Imported on use, so importing sagas_core (or this module) never needs dishka.
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(INSTALL_DISHKA) from exc


class DishkaResolver:
    """A :class:`~sagas_core.di.ScopedResolver` over a dishka ``AsyncContainer``.

    Args:
        container: The APP-scope container (``make_async_container(...)``); the caller owns
            and closes it.
        scope: The scope entered per command; default: the next one (``Scope.REQUEST``).

    Raises:
        ImportError: dishka is not installed (with the install hint).
    """

    def __init__(self, container: AsyncContainer, *, scope: BaseScope | None = None) -> None:
        self._exceptions = _dishka("dishka.exceptions")
        self._keys = _dishka("dishka.entities.key")
        self._component = _dishka("dishka").DEFAULT_COMPONENT
        self.container = container
        self.scope = scope

    @contextlib.asynccontextmanager
    async def message_scope(self) -> AsyncIterator[MessageScope]:
        """Enter a REQUEST scope for one command; leaving it runs its finalizers.

        Raises:
            Exception: a finalizer's error (a single one unwrapped from dishka's ``ExitError``,
                so a ``ConnectionError`` while closing is retried like a handler's).
        """
        exit_error: type[BaseException] = self._exceptions.ExitError
        try:
            async with self.container(scope=self.scope) as request:
                yield _DishkaScope(request, self._exceptions.NoFactoryError)
        except exit_error as exc:
            errors: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
            if len(errors) == 1:
                raise errors[0] from exc
            raise

    def provides(self, dependency: Any) -> bool:
        """Whether any scope of the container has a factory for ``dependency``.

        Reads the container's registries (nothing is created); when they cannot be read (a
        dishka version that lays them out differently) it answers ``True`` and a missing
        dependency shows at the first command instead.
        """
        key = self._keys.DependencyKey(dependency, self._component)
        try:
            container: Any = self.container
            while container.parent_container is not None:
                container = container.parent_container
            registry = container.registry
            while registry is not None:
                if key in registry.factories:
                    return True
                registry = registry.child_registry
        except AttributeError:
            return True
        return False


class _DishkaScope:
    """One command's dishka container: ``resolve`` returns an awaitable, as dishka is async."""

    def __init__(self, container: AsyncContainer, no_factory: type[Exception]) -> None:
        self._container = container
        self._no_factory = no_factory

    def resolve(self, dependency: type[T]) -> Any:
        return self._get(dependency)

    async def _get(self, dependency: type[T]) -> T:
        try:
            return await self._container.get(dependency)
        except self._no_factory as exc:
            name = dependency_name(dependency)
            raise MissingDependency(
                f"nothing provides {name} in the dishka container: add a provider for it ({exc})"
            ) from exc
