"""sagas core: build saga definitions, decide transitions, orchestrate, host participants.

This package never imports a broker client or a database driver: those live in
``sagas_rabbitmq`` and ``sagas_sqlalchemy``.
"""

from sagas_core.builder import SagaBuilder, StepBuilder, local_destination
from sagas_core.circuit import CircuitBreaker, CircuitState
from sagas_core.clock import SystemClock
from sagas_core.definition import (
    ActionKind,
    ActionSpec,
    EventRole,
    EventTrigger,
    MissingSagaPolicy,
    SagaDefinition,
    StepDefinition,
)
from sagas_core.di import (
    Dependencies,
    MessageScope,
    MissingDependency,
    Resolver,
    ScopedResolver,
)
from sagas_core.embedded import close_store, open_store
from sagas_core.engine import Decision, decide, due_input
from sagas_core.events import EventOutcome, event_envelope
from sagas_core.host import SagaHost, SagaHostBuilder, load_host
from sagas_core.orchestrator import (
    Orchestrator,
    OrphanReplyPolicy,
    SagaRegistry,
    StatusEvents,
    reply_queue,
)
from sagas_core.participant import (
    CachedOutcome,
    CommandContext,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    Participant,
    TransactionalIdempotencyStore,
    UnitOfWork,
)
from sagas_core.relay import OutboxRelay
from sagas_core.retry import (
    Backoff,
    ExponentialBackoff,
    FixedBackoff,
    RetryPolicy,
    exponential,
    fixed,
    no_retry,
)
from sagas_core.runtime import SagaRuntime
from sagas_core.settings import SagasSettings, SettingsError, load_settings
from sagas_core.timeouts import TimeoutService

__version__ = "0.1.0"

__all__ = [
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
