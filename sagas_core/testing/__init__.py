"""In-memory implementations of every port, shipped for users' tests and the embedded mode.

* :class:`InMemorySagaStore`: the state backend (sagas, history, outbox, inbox).
* :class:`InMemoryBus`: the message bus (queues, competing consumers, redelivery, dead letters).
* :class:`FakeClock`: time that moves only when a test says so.
* :class:`SagaTestHarness`: drives your sagas deterministically against stub participants.
"""

from sagas_core.testing.bus import InMemoryBus, topic_matches
from sagas_core.testing.clock import FakeClock
from sagas_core.testing.harness import SagaTestHarness, StubParticipant, StubScript
from sagas_core.testing.store import InMemorySagaStore

__all__ = [
    "FakeClock",
    "InMemoryBus",
    "InMemorySagaStore",
    "SagaTestHarness",
    "StubParticipant",
    "StubScript",
    "topic_matches",
]
