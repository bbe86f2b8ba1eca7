"""Group commit on PostgreSQL (psycopg): saves that queue up share one statement and commit.

Saves of different sagas made at once are written together, but each still gets its own
outcome: the stale one a ConcurrencyConflict, the duplicate one a DuplicateMessage, the others
their rows (and their outbox leases), exactly as if each had been written alone.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    ErrorInfo,
    InboxEntry,
    OutboxRecord,
    SagaChange,
    SagaStatus,
)
from sagas_sqlalchemy import SqlSagaStore
from tests.contracts.store_contract import T0, insert, make_envelope, make_instance, update

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SAGAS = 30
LEASE = timedelta(seconds=30)


@pytest.fixture
def store(psycopg_store: SqlSagaStore) -> SqlSagaStore:
    return psycopg_store


def group_batches(store: SqlSagaStore) -> int:
    assert store._group is not None
    return store._group.batches


async def test_saves_made_at_once_are_written_together_each_with_its_own_outcome(
    store: SqlSagaStore,
) -> None:
    sagas = [make_instance(f"saga-{n}") for n in range(SAGAS)]
    await store.save([insert(sagas[0], inbox=InboxEntry("orchestrator", "seen"))])
    await store.save([insert(sagas[1])])
    await store.save([insert(sagas[2])])
    parked = sagas[2].model_copy(
        update={
            "version": 2,
            "status": SagaStatus.FAILED,
            "error": ErrorInfo(code="parked", message="by hand"),
        }
    )

    outcomes = await asyncio.gather(
        # a duplicate message for saga-0: refused, nothing written
        store.save([update(sagas[0], inbox=InboxEntry("orchestrator", "seen"))]),
        # a stale version for saga-1 (expects 3, is 1): refused, nothing written
        store.save([update(sagas[1].model_copy(update={"version": 3}))]),
        # a status-only change of saga-2
        store.save([SagaChange(instance=parked, expected_version=1, status_only=True)]),
        # new sagas, their commands leased to relay-a
        *(
            store.save_leased(
                [
                    insert(
                        sagas[n],
                        outbox=[make_envelope(f"m-{n}", sagas[n].saga_id)],
                        inbox=InboxEntry("orchestrator", f"in-{n}"),
                    )
                ],
                owner="relay-a",
                until=T0 + LEASE,
            )
            for n in range(3, SAGAS)
        ),
        return_exceptions=True,
    )

    assert group_batches(store) > 0  # some of them shared a statement
    assert isinstance(outcomes[0], DuplicateMessage)
    assert isinstance(outcomes[1], ConcurrencyConflict)
    assert outcomes[1].actual_version == 1
    assert outcomes[2] is None
    for n, leased in zip(range(3, SAGAS), outcomes[3:], strict=True):
        assert isinstance(leased, list)
        [record] = leased
        assert isinstance(record, OutboxRecord)
        assert record.envelope.message_id == f"m-{n}"
        assert await store.load(f"saga-{n}") == sagas[n]
        assert await store.is_processed("orchestrator", f"in-{n}")
    assert await store.load("saga-0") == sagas[0]
    assert await store.load("saga-1") == sagas[1]
    shown = await store.load("saga-2")
    assert shown is not None
    assert (shown.status, shown.version) == (SagaStatus.FAILED, 2)
    assert await store.claim(owner="relay-b", limit=100, lease=LEASE, now=T0) == []
    mine = await store.claim(owner="relay-a", limit=100, lease=LEASE, now=T0)
    assert sorted(record.envelope.message_id for record in mine) == sorted(
        f"m-{n}" for n in range(3, SAGAS)
    )


async def test_two_changes_of_one_saga_made_at_once_are_written_in_turn(
    store: SqlSagaStore,
) -> None:
    saga = make_instance()
    await store.save([insert(saga)])
    others = [make_instance(f"other-{n}") for n in range(10)]

    outcomes = await asyncio.gather(
        *(store.save([insert(other)]) for other in others),
        store.save([update(saga, outbox=[make_envelope("first")])]),
        store.save([update(saga, outbox=[make_envelope("second")])]),
        return_exceptions=True,
    )

    # Both expected version 1: the first written wins, the second finds the saga moved on.
    assert outcomes[:10] == [None] * 10
    assert sorted(type(outcome).__name__ for outcome in outcomes[10:]) == [
        "ConcurrencyConflict",
        "NoneType",
    ]
    stored = await store.load(saga.saga_id)
    assert stored is not None
    assert stored.version == 2
    assert await store.pending_count() == 1
