"""The public surface is pinned: adding, removing or renaming a public name is a deliberate act.

Update the lists below in the same change that alters an ``__all__`` (and the changelog).
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

SAGAS_ABSTRACTIONS = [
    "BusUnavailable",
    "Cancel",
    "Clock",
    "CommandMessage",
    "Compensate",
    "ConcurrencyConflict",
    "DeadLetterMessage",
    "DeadlineStore",
    "DefinitionChanged",
    "DuplicateMessage",
    "Envelope",
    "ErrorInfo",
    "EventInput",
    "EventKind",
    "EventReceived",
    "HistoryEntry",
    "InboxEntry",
    "InvalidDefinition",
    "InvalidEvent",
    "InvalidOperation",
    "InvalidSagaData",
    "MessageBus",
    "MessageDecodeError",
    "MessageHandler",
    "MessageTooLarge",
    "OperatorInput",
    "OutboxHandoff",
    "OutboxRecord",
    "OutboxStore",
    "ParticipantError",
    "PublishError",
    "ReplyMessage",
    "ReplyStatus",
    "Resolve",
    "RetryCompensation",
    "RetryDue",
    "RetryableError",
    "RouteKind",
    "SagaAlreadyExists",
    "SagaChange",
    "SagaError",
    "SagaEvent",
    "SagaInput",
    "SagaInstance",
    "SagaNotFound",
    "SagaReader",
    "SagaRepository",
    "SagaStatus",
    "SagaStore",
    "SagaTimeout",
    "Start",
    "StepFailed",
    "StepInput",
    "StepKind",
    "StepState",
    "StepStatus",
    "StepSucceeded",
    "StoreError",
    "StoreUnavailable",
    "Subscription",
    "Timeout",
    "TransportError",
    "Unavailable",
    "UnknownSagaType",
    "WaitKind",
]

SAGAS_CORE = [
    "ActionKind",
    "ActionSpec",
    "Backoff",
    "CachedOutcome",
    "CircuitBreaker",
    "CircuitState",
    "CommandContext",
    "Decision",
    "Dependencies",
    "EventOutcome",
    "EventRole",
    "EventTrigger",
    "ExponentialBackoff",
    "FixedBackoff",
    "IdempotencyStore",
    "InMemoryIdempotencyStore",
    "MessageScope",
    "MissingDependency",
    "MissingSagaPolicy",
    "Orchestrator",
    "OrphanReplyPolicy",
    "OutboxRelay",
    "Participant",
    "Resolver",
    "RetryPolicy",
    "SagaBuilder",
    "SagaDefinition",
    "SagaHost",
    "SagaHostBuilder",
    "SagaRegistry",
    "SagaRuntime",
    "SagasSettings",
    "ScopedResolver",
    "SettingsError",
    "StatusEvents",
    "StepBuilder",
    "StepDefinition",
    "SystemClock",
    "TimeoutService",
    "TransactionalIdempotencyStore",
    "UnitOfWork",
    "__version__",
    "close_store",
    "decide",
    "due_input",
    "event_envelope",
    "exponential",
    "fixed",
    "load_host",
    "load_settings",
    "local_destination",
    "no_retry",
    "open_store",
    "reply_queue",
]

SAGAS_CORE_TESTING = [
    "FakeClock",
    "InMemoryBus",
    "InMemorySagaStore",
    "SagaTestHarness",
    "StubParticipant",
    "StubScript",
    "topic_matches",
]

SAGAS_CORE_MEMORY = ["InMemoryBus", "InMemorySagaStore", "topic_matches"]

SAGAS_CORE_PLUGINS = [
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

PINNED = {
    "sagas_abstractions": SAGAS_ABSTRACTIONS,
    "sagas_core": SAGAS_CORE,
    "sagas_core.memory": SAGAS_CORE_MEMORY,
    "sagas_core.plugins": SAGAS_CORE_PLUGINS,
    "sagas_core.testing": SAGAS_CORE_TESTING,
}


def module(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_all_lists_exactly_the_pinned_public_names(name: str) -> None:
    assert list(module(name).__all__) == PINNED[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_all_is_sorted_without_duplicates(name: str) -> None:
    exported = list(module(name).__all__)
    assert exported == sorted(set(exported))


@pytest.mark.parametrize(
    ("name", "public"), [(name, public) for name, names in PINNED.items() for public in names]
)
def test_every_public_name_is_importable_and_documented(name: str, public: str) -> None:
    value = getattr(module(name), public)

    if inspect.isclass(value):
        assert value.__dict__.get("__doc__"), f"{name}.{public} has no docstring"
    elif inspect.isfunction(value):
        assert inspect.getdoc(value), f"{name}.{public} has no docstring"


def test_the_package_version_is_a_string() -> None:
    assert isinstance(module("sagas_core").__version__, str)
