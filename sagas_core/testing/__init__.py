"""In-memory implementations of every port and a saga test harness, shipped for users' tests.

* :class:`InMemorySagaStore`: the state backend (sagas, history, outbox, inbox).
* :class:`InMemoryBus`: the message bus (queues, competing consumers, redelivery, dead letters).
* :class:`FakeClock`: time that moves only when a test says so.
* :class:`SagaTestHarness`: drives your sagas deterministically against stub participants.

The store and the bus live in :mod:`sagas_core.memory` (production code uses them too); they are
re-exported here.
"""

from sagas_core.memory.bus import InMemoryBus, topic_matches
from sagas_core.memory.store import InMemorySagaStore
from sagas_core.testing.clock import FakeClock
from sagas_core.testing.harness import SagaTestHarness, StubParticipant, StubScript

__all__ = [
    "FakeClock",
    "InMemoryBus",
    "InMemorySagaStore",
    "SagaTestHarness",
    "StubParticipant",
    "StubScript",
    "topic_matches",
]
