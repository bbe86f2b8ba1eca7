"""In-memory implementations of the bus and store ports, for production paths and tests.

* :class:`InMemorySagaStore`: the state backend (sagas, history, outbox, inbox), lost on exit.
* :class:`InMemoryBus`: the message bus within one process (queues, competing consumers,
  redelivery, dead letters).

The host uses them when no broker URL is set (the in-process bus) or when it is told to keep state
in memory; the embedded store falls back to the in-memory store when asked to. They are
re-exported by :mod:`sagas_core.testing` for users' tests.
"""

from sagas_core.memory.bus import InMemoryBus, topic_matches
from sagas_core.memory.store import InMemorySagaStore

__all__ = ["InMemoryBus", "InMemorySagaStore", "topic_matches"]
