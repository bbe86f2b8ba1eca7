"""The contract every :class:`~sagas_abstractions.SagaRepository` backend passes.

A backend's test module subclasses :class:`SagaStoreContract` and overrides one fixture::

    class TestSqliteStore(SagaStoreContract):
        @pytest.fixture
        async def store(self) -> AsyncIterator[SagaRepository]:
            async with make_sqlite_store() as store:
                yield store

The fixture must give each test an empty store. Nothing here reaches into a backend's internals:
every assertion goes through the ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagas_abstractions import (
    ConcurrencyConflict,
    DuplicateMessage,
    Envelope,
    ErrorInfo,
    HistoryEntry,
    InboxEntry,
    RouteKind,
    SagaChange,
    SagaInstance,
    SagaRepository,
    SagaStatus,
    StepKind,
    StepState,
    StepStatus,
    WaitKind,
)
from sagas_abstractions.ports import OutboxHandoff

__all__ = [
    "T0",
    "SagaStoreContract",
    "insert",
    "make_envelope",
    "make_history",
    "make_instance",
    "update",
]

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""The reference moment of every contract test."""

LEASE = timedelta(seconds=30)


def _handoff(store: SagaRepository) -> OutboxHandoff:
    assert isinstance(store, OutboxHandoff), "the store should offer the outbox hand-off"
    return store


def make_instance(
    saga_id: str = "saga-1",
    *,
    saga_type: str = "order",
    version: int = 1,
    status: SagaStatus = SagaStatus.RUNNING,
    updated_at: datetime = T0,
    deadline_at: datetime | None = None,
    saga_deadline_at: datetime | None = None,
    data: dict[str, Any] | None = None,
    **extra: Any,
) -> SagaInstance:
    """A valid saga instance with two steps; keyword arguments override any field."""
    fields: dict[str, Any] = {
        "saga_id": saga_id,
        "saga_type": saga_type,
        "definition_version": "fp-1",
        "status": status,
        "current_step": 0,
        "attempt": 1,
        "wait": WaitKind.REPLY if deadline_at is not None else None,
        "deadline_at": deadline_at,
        "saga_deadline_at": saga_deadline_at,
        "data": {"order_id": saga_id} if data is None else data,
        "steps": (
            StepState(name="reserve", status=StepStatus.RUNNING, attempts=1, started_at=T0),
            StepState(name="pay"),
        ),
        "version": version,
        "created_at": T0,
        "updated_at": updated_at,
    }
    fields.update(extra)
    return SagaInstance(**fields)


def make_envelope(message_id: str, saga_id: str = "saga-1", **extra: Any) -> Envelope:
    """A command envelope for ``saga_id``; keyword arguments override any field."""
    fields: dict[str, Any] = {
        "route": RouteKind.COMMAND,
        "key": "inventory",
        "message_id": message_id,
        "message_type": "ReserveInventory",
        "correlation_id": saga_id,
        "reply_to": "replies.orchestrator",
        "headers": {"x-saga-type": "order", "x-saga-step": "reserve", "x-saga-attempt": "1"},
        "body": b'{"sku": "A-1", "qty": 2}',
        "timestamp": T0,
    }
    fields.update(extra)
    return Envelope(**fields)


def make_history(instance: SagaInstance, input_name: str = "Start", **extra: Any) -> HistoryEntry:
    """A history row for ``instance`` at its version; keyword arguments override any field."""
    fields: dict[str, Any] = {
        "saga_id": instance.saga_id,
        "version": instance.version,
        "at": instance.updated_at,
        "input": input_name,
        "to_status": instance.status,
    }
    fields.update(extra)
    return HistoryEntry(**fields)


def insert(
    instance: SagaInstance,
    *,
    outbox: Sequence[Envelope] = (),
    history: Sequence[HistoryEntry] | None = None,
    inbox: InboxEntry | None = None,
) -> SagaChange:
    """A change inserting ``instance`` (with a history row unless told otherwise)."""
    return SagaChange(
        instance=instance,
        expected_version=None,
        outbox=outbox,
        history=[make_history(instance)] if history is None else history,
        inbox=inbox,
    )


def update(
    instance: SagaInstance,
    *,
    outbox: Sequence[Envelope] = (),
    history: Sequence[HistoryEntry] | None = None,
    inbox: InboxEntry | None = None,
) -> SagaChange:
    """A change moving ``instance`` to the next version (with a history row)."""
    following = instance.model_copy(
        update={"version": instance.version + 1, "updated_at": instance.updated_at + timedelta(1)}
    )
    return SagaChange(
        instance=following,
        expected_version=instance.version,
        outbox=outbox,
        history=[make_history(following, "StepSucceeded")] if history is None else history,
        inbox=inbox,
    )


class SagaStoreContract:
    """Tests of the semantics documented in :mod:`sagas_abstractions.ports`.

    Subclasses override the ``store`` fixture; it must yield an empty repository.
    """

    @pytest.fixture
    async def store(self) -> AsyncIterator[SagaRepository]:
        """Yield an empty repository of the backend under test (subclasses override this)."""
        pytest.skip("the store fixture is provided by a backend subclass")
        yield  # type: ignore[unreachable]  # noqa: PT022 - an async generator, like overrides

    # ------------------------------------------------------------------ insert and update

    async def test_load_and_get_return_none_for_an_unknown_saga(
        self, store: SagaRepository
    ) -> None:
        assert await store.load("nope") is None
        assert await store.get("nope") is None

    async def test_inserts_a_new_saga_when_expected_version_is_none(
        self, store: SagaRepository
    ) -> None:
        instance = make_instance()

        await store.save([insert(instance)])

        assert await store.load("saga-1") == instance
        assert await store.get("saga-1") == instance

    async def test_inserting_a_saga_that_exists_raises_concurrency_conflict(
        self, store: SagaRepository
    ) -> None:
        await store.save([insert(make_instance())])

        with pytest.raises(ConcurrencyConflict) as caught:
            await store.save([insert(make_instance(data={"other": True}))])

        assert caught.value.saga_id == "saga-1"
        assert caught.value.expected_version is None
        loaded = await store.load("saga-1")
        assert loaded is not None
        assert loaded.data == {"order_id": "saga-1"}

    async def test_updates_a_saga_when_the_expected_version_matches(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        await store.save([insert(first)])
        change = update(first.model_copy(update={"data": {"order_id": "saga-1", "paid": True}}))

        await store.save([change])

        loaded = await store.load("saga-1")
        assert loaded == change.instance
        assert loaded.version == 2

    async def test_a_stale_version_raises_concurrency_conflict_with_saga_id_and_both_versions(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        await store.save([insert(first)])
        await store.save([update(first)])

        with pytest.raises(ConcurrencyConflict) as caught:
            await store.save([update(first.model_copy(update={"data": {"lost": "update"}}))])

        assert caught.value.saga_id == "saga-1"
        assert caught.value.expected_version == 1
        assert caught.value.actual_version == 2
        loaded = await store.load("saga-1")
        assert loaded is not None
        assert loaded.version == 2
        assert loaded.data == {"order_id": "saga-1"}

    async def test_updating_a_saga_that_does_not_exist_raises_concurrency_conflict(
        self, store: SagaRepository
    ) -> None:
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.save([update(make_instance("ghost"))])

        assert caught.value.saga_id == "ghost"
        assert caught.value.expected_version == 1
        assert await store.load("ghost") is None

    async def test_an_append_only_change_writes_history_outbox_and_inbox_but_leaves_the_row(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        await store.save([insert(first)])
        unchanged_version = first.model_copy(update={"data": {"must": "not be written"}})
        stale_note = make_history(first, "StepSucceeded", outcome="stale", message_id="r-1")

        await store.save(
            [
                SagaChange(
                    instance=unchanged_version,
                    expected_version=1,
                    outbox=[make_envelope("evt-1")],
                    history=[stale_note],
                    inbox=InboxEntry(consumer="orchestrator", message_id="r-1"),
                )
            ]
        )

        assert await store.load("saga-1") == first
        assert (await store.history("saga-1"))[-1] == stale_note
        assert await store.pending_count() == 1
        assert await store.is_processed("orchestrator", "r-1")

    async def test_a_status_only_change_moves_status_error_and_deadlines_and_keeps_the_data(
        self, store: SagaRepository
    ) -> None:
        first = make_instance(deadline_at=T0 + timedelta(seconds=5), data={"order_id": "kept"})
        await store.save([insert(first)])
        error = ErrorInfo(code="unknown_saga_type", message="not registered")
        parked = first.model_copy(
            update={
                "status": SagaStatus.FAILED,
                "error": error,
                "wait": None,
                "deadline_at": None,
                "version": 2,
                "updated_at": T0 + timedelta(seconds=1),
                "data": {"order_id": "from a partial view"},
                "current_step": 1,
            }
        )
        entry = make_history(parked, "Park", from_status=SagaStatus.RUNNING)

        await store.save(
            [
                SagaChange(
                    instance=parked,
                    expected_version=1,
                    outbox=[make_envelope("park-event")],
                    history=[entry],
                    inbox=InboxEntry("orchestrator", "reply-1"),
                    status_only=True,
                )
            ]
        )

        loaded = await store.load("saga-1")
        assert loaded is not None
        assert (loaded.status, loaded.error, loaded.version) == (SagaStatus.FAILED, error, 2)
        assert (loaded.wait, loaded.deadline_at) == (None, None)
        assert loaded.updated_at == T0 + timedelta(seconds=1)
        assert (loaded.data, loaded.current_step) == ({"order_id": "kept"}, 0)
        assert await store.due(T0 + timedelta(days=1), 10) == []
        assert (await store.history("saga-1"))[-1] == entry
        assert await store.is_processed("orchestrator", "reply-1")
        assert await store.pending_count() == 1

    async def test_a_status_only_change_checks_the_version_and_writes_nothing_on_conflict(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        await store.save([insert(first)])
        await store.save([update(first)])
        parked = first.model_copy(update={"status": SagaStatus.FAILED, "version": 2})

        with pytest.raises(ConcurrencyConflict):
            await store.save(
                [
                    SagaChange(
                        instance=parked,
                        expected_version=1,
                        history=[make_history(parked, "Park")],
                        status_only=True,
                    )
                ]
            )

        loaded = await store.load("saga-1")
        assert loaded is not None
        assert loaded.status is SagaStatus.RUNNING
        assert len(await store.history("saga-1")) == 2

    async def test_writes_changes_to_several_sagas_in_one_batch(
        self, store: SagaRepository
    ) -> None:
        one, two = make_instance("saga-1"), make_instance("saga-2")
        await store.save([insert(one)])

        await store.save(
            [
                update(one, outbox=[make_envelope("m-1", "saga-1")]),
                insert(two, outbox=[make_envelope("m-2", "saga-2")]),
            ]
        )

        loaded_one, loaded_two = await store.load("saga-1"), await store.load("saga-2")
        assert loaded_one is not None
        assert loaded_one.version == 2
        assert loaded_two == two
        assert await store.pending_count() == 2

    # ------------------------------------------------------------------ atomicity and inbox

    async def test_a_batch_whose_second_change_conflicts_writes_nothing_of_the_first(
        self, store: SagaRepository
    ) -> None:
        other = make_instance("saga-2")
        await store.save([insert(other, history=[])])
        await store.save([update(other, history=[])])

        with pytest.raises(ConcurrencyConflict):
            await store.save(
                [
                    insert(
                        make_instance("saga-1"),
                        outbox=[make_envelope("m-1")],
                        inbox=InboxEntry(consumer="orchestrator", message_id="start-1"),
                    ),
                    update(other),  # stale: saga-2 is at version 2
                ]
            )

        assert await store.load("saga-1") is None
        assert await store.history("saga-1") == []
        assert await store.history("saga-2") == []
        assert await store.pending_count() == 0
        assert not await store.is_processed("orchestrator", "start-1")
        assert await store.claim(owner="relay", limit=10, lease=LEASE, now=T0) == []

    async def test_a_duplicate_inbox_entry_raises_duplicate_message_and_writes_nothing(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        await store.save(
            [insert(first, inbox=InboxEntry(consumer="orchestrator", message_id="m-1"))]
        )

        with pytest.raises(DuplicateMessage) as caught:
            await store.save(
                [
                    update(
                        first,
                        outbox=[make_envelope("cmd-2")],
                        inbox=InboxEntry(consumer="orchestrator", message_id="m-1"),
                    )
                ]
            )

        assert caught.value.consumer == "orchestrator"
        assert caught.value.message_id == "m-1"
        assert await store.load("saga-1") == first
        assert len(await store.history("saga-1")) == 1
        assert await store.pending_count() == 0

    async def test_the_same_inbox_entry_twice_in_one_batch_raises_duplicate_message(
        self, store: SagaRepository
    ) -> None:
        entry = InboxEntry(consumer="orchestrator", message_id="m-1")

        with pytest.raises(DuplicateMessage):
            await store.save(
                [
                    insert(make_instance("saga-1"), inbox=entry),
                    insert(make_instance("saga-2"), inbox=entry),
                ]
            )

        assert await store.load("saga-1") is None
        assert not await store.is_processed("orchestrator", "m-1")

    async def test_is_processed_records_message_ids_per_consumer(
        self, store: SagaRepository
    ) -> None:
        await store.save(
            [insert(make_instance(), inbox=InboxEntry(consumer="orchestrator", message_id="m-1"))]
        )

        assert await store.is_processed("orchestrator", "m-1")
        assert not await store.is_processed("orchestrator", "m-2")
        assert not await store.is_processed("inventory", "m-1")

    async def test_the_same_message_id_may_be_processed_by_two_consumers(
        self, store: SagaRepository
    ) -> None:
        await store.save(
            [
                insert(make_instance("saga-1"), inbox=InboxEntry("group-a", "m-1")),
                insert(make_instance("saga-2"), inbox=InboxEntry("group-b", "m-1")),
            ]
        )

        assert await store.is_processed("group-a", "m-1")
        assert await store.is_processed("group-b", "m-1")

    # ------------------------------------------------------------------ reader

    async def test_find_filters_by_status_type_and_updated_before_least_recent_first(
        self, store: SagaRepository
    ) -> None:
        sagas = [
            make_instance("late", updated_at=T0 + timedelta(minutes=3)),
            make_instance("early", updated_at=T0 + timedelta(minutes=1)),
            make_instance("middle", updated_at=T0 + timedelta(minutes=2)),
            make_instance("done", status=SagaStatus.COMPLETED, updated_at=T0),
            make_instance("refund", saga_type="refund", updated_at=T0),
        ]
        await store.save([insert(saga) for saga in sagas])

        running_orders = await store.find(status=SagaStatus.RUNNING, saga_type="order")
        assert [saga.saga_id for saga in running_orders] == ["early", "middle", "late"]
        assert [saga.saga_id for saga in await store.find(saga_type="refund")] == ["refund"]
        assert [saga.saga_id for saga in await store.find(status=SagaStatus.COMPLETED)] == ["done"]
        before = await store.find(saga_type="order", updated_before=T0 + timedelta(minutes=2))
        assert [saga.saga_id for saga in before] == ["done", "early"]
        assert len(await store.find()) == 5

    async def test_find_returns_at_most_limit_sagas(self, store: SagaRepository) -> None:
        await store.save(
            [
                insert(make_instance(f"saga-{n}", updated_at=T0 + timedelta(seconds=n)))
                for n in range(5)
            ]
        )

        found = await store.find(limit=2)

        assert [saga.saga_id for saga in found] == ["saga-0", "saga-1"]

    async def test_history_is_returned_oldest_first_across_saves(
        self, store: SagaRepository
    ) -> None:
        first = make_instance()
        second = update(first)
        third = update(second.instance)
        await store.save([insert(first)])
        await store.save([second])
        await store.save([third])

        history = await store.history("saga-1")

        assert [entry.version for entry in history] == [1, 2, 3]
        assert [entry.input for entry in history] == ["Start", "StepSucceeded", "StepSucceeded"]
        assert await store.history("other") == []

    async def test_history_entries_round_trip_every_field(self, store: SagaRepository) -> None:
        instance = make_instance()
        entry = HistoryEntry(
            saga_id="saga-1",
            version=1,
            at=T0,
            input="Compensate",
            outcome="applied",
            from_status=SagaStatus.RUNNING,
            to_status=SagaStatus.COMPENSATING,
            step="reserve",
            attempt=3,
            kind=StepKind.COMPENSATE,
            reason="customer cancelled — «urgent»",
            actor="alice@example.com",
            message_id="op-1",
        )

        await store.save([insert(instance, history=[entry])])

        assert await store.history("saga-1") == [entry]

    # ------------------------------------------------------------------ deadlines

    async def test_due_returns_active_sagas_whose_next_deadline_passed_earliest_first(
        self, store: SagaRepository
    ) -> None:
        now = T0 + timedelta(hours=1)
        sagas = [
            make_instance("reply-late", deadline_at=now - timedelta(minutes=10)),
            make_instance("saga-deadline", saga_deadline_at=now - timedelta(minutes=20)),
            make_instance(
                "compensating",
                status=SagaStatus.COMPENSATING,
                deadline_at=now - timedelta(minutes=5),
            ),
            make_instance("exactly-now", deadline_at=now),
            make_instance("future", deadline_at=now + timedelta(seconds=1)),
            make_instance("no-deadline"),
        ]
        await store.save([insert(saga) for saga in sagas])

        due = await store.due(now, 10)

        assert [saga.saga_id for saga in due] == [
            "saga-deadline",
            "reply-late",
            "compensating",
            "exactly-now",
        ]

    async def test_due_excludes_terminal_and_parked_sagas(self, store: SagaRepository) -> None:
        past = T0 - timedelta(minutes=1)
        sagas = [
            make_instance(f"saga-{status.value}", status=status, deadline_at=past)
            for status in (
                SagaStatus.COMPLETED,
                SagaStatus.COMPENSATED,
                SagaStatus.RESOLVED,
                SagaStatus.FAILED,
            )
        ]
        await store.save([insert(saga) for saga in sagas])

        assert await store.due(T0, 10) == []

    async def test_due_ignores_the_saga_deadline_of_a_compensating_saga(
        self, store: SagaRepository
    ) -> None:
        past = T0 - timedelta(minutes=1)
        await store.save(
            [
                insert(
                    make_instance(
                        "compensating", status=SagaStatus.COMPENSATING, saga_deadline_at=past
                    )
                )
            ]
        )

        assert await store.due(T0, 10) == []

    async def test_due_follows_a_deadline_that_moved_on_update(self, store: SagaRepository) -> None:
        first = make_instance(deadline_at=T0 - timedelta(seconds=1))
        await store.save([insert(first)])
        moved = first.model_copy(update={"deadline_at": T0 + timedelta(minutes=5)})

        await store.save([update(moved)])

        assert await store.due(T0, 10) == []
        assert [saga.version for saga in await store.due(T0 + timedelta(minutes=5), 10)] == [2]

    async def test_due_returns_at_most_limit_sagas(self, store: SagaRepository) -> None:
        await store.save(
            [
                insert(make_instance(f"saga-{n}", deadline_at=T0 - timedelta(seconds=10 - n)))
                for n in range(5)
            ]
        )

        due = await store.due(T0, 2)

        assert [saga.saga_id for saga in due] == ["saga-0", "saga-1"]

    # ------------------------------------------------------------------ deadline claims

    async def _insert_due(self, store: SagaRepository, count: int) -> list[str]:
        """``count`` sagas due at T0, saga-0 the earliest; returns their ids in due order."""
        sagas = [
            make_instance(f"saga-{n}", deadline_at=T0 - timedelta(seconds=count - n))
            for n in range(count)
        ]
        await store.save([insert(saga) for saga in sagas])
        return [saga.saga_id for saga in sagas]

    async def test_claim_due_returns_due_sagas_earliest_first_up_to_limit(
        self, store: SagaRepository
    ) -> None:
        ids = await self._insert_due(store, 4)
        await store.save([insert(make_instance("future", deadline_at=T0 + timedelta(seconds=1)))])

        claimed = await store.claim_due(T0, 3, owner="a", lease=LEASE)

        assert [saga.saga_id for saga in claimed] == ids[:3]
        assert claimed[0] == await store.load("saga-0")

    async def test_two_owners_claim_disjoint_sets_and_claimed_sagas_stay_visible_to_due(
        self, store: SagaRepository
    ) -> None:
        ids = await self._insert_due(store, 5)

        first = await store.claim_due(T0, 3, owner="a", lease=LEASE)
        second = await store.claim_due(T0, 10, owner="b", lease=LEASE)

        assert [saga.saga_id for saga in first] == ids[:3]
        assert [saga.saga_id for saga in second] == ids[3:]
        assert await store.claim_due(T0, 10, owner="c", lease=LEASE) == []
        assert [saga.saga_id for saga in await store.due(T0, 10)] == ids

    async def test_concurrent_claimers_get_disjoint_sets_covering_every_due_saga(
        self, store: SagaRepository
    ) -> None:
        ids = await self._insert_due(store, 20)

        batches = await asyncio.gather(
            *(store.claim_due(T0, 6, owner=f"w{n}", lease=LEASE) for n in range(5))
        )

        claimed = [saga.saga_id for batch in batches for saga in batch]
        assert sorted(claimed) == sorted(ids)  # each once: disjoint, and nothing left out

    async def test_an_owner_claims_its_own_sagas_again_and_extends_the_lease(
        self, store: SagaRepository
    ) -> None:
        ids = await self._insert_due(store, 2)
        await store.claim_due(T0, 10, owner="a", lease=LEASE)
        later = T0 + LEASE - timedelta(seconds=1)

        again = await store.claim_due(later, 10, owner="a", lease=LEASE)

        assert [saga.saga_id for saga in again] == ids
        # Extended from `later`: still held against others after the first lease ran out.
        assert await store.claim_due(T0 + LEASE, 10, owner="b", lease=LEASE) == []

    async def test_an_expired_claim_is_claimable_by_another_owner(
        self, store: SagaRepository
    ) -> None:
        ids = await self._insert_due(store, 2)
        await store.claim_due(T0, 10, owner="a", lease=LEASE)

        assert (
            await store.claim_due(T0 + LEASE - timedelta(seconds=1), 10, owner="b", lease=LEASE)
            == []
        )
        taken = await store.claim_due(T0 + LEASE, 10, owner="b", lease=LEASE)

        assert [saga.saga_id for saga in taken] == ids
        assert await store.claim_due(T0 + LEASE, 10, owner="a", lease=LEASE) == []

    async def test_saving_a_saga_releases_its_claim(self, store: SagaRepository) -> None:
        first = make_instance(deadline_at=T0 - timedelta(seconds=1))
        await store.save([insert(first)])
        await store.claim_due(T0, 10, owner="a", lease=LEASE)
        moved = first.model_copy(update={"deadline_at": T0 + timedelta(seconds=2)})

        await store.save([update(moved)])

        # Due again before the old lease ran out, and anyone may take it.
        soon = T0 + timedelta(seconds=2)
        assert [
            saga.version for saga in await store.claim_due(soon, 10, owner="b", lease=LEASE)
        ] == [2]

    async def test_an_append_only_change_keeps_the_claim(self, store: SagaRepository) -> None:
        instance = make_instance(deadline_at=T0 - timedelta(seconds=1))
        await store.save([insert(instance)])
        await store.claim_due(T0, 10, owner="a", lease=LEASE)

        await store.save(
            [SagaChange(instance=instance, expected_version=1, history=[make_history(instance)])]
        )

        assert await store.claim_due(T0, 10, owner="b", lease=LEASE) == []

    async def test_claim_due_never_returns_terminal_or_idle_compensating_sagas(
        self, store: SagaRepository
    ) -> None:
        past = T0 - timedelta(minutes=1)
        sagas = [
            make_instance(f"saga-{status.value}", status=status, deadline_at=past)
            for status in (
                SagaStatus.COMPLETED,
                SagaStatus.COMPENSATED,
                SagaStatus.RESOLVED,
                SagaStatus.FAILED,
            )
        ]
        sagas.append(
            make_instance("compensating", status=SagaStatus.COMPENSATING, saga_deadline_at=past)
        )
        sagas.append(make_instance("no-deadline"))
        await store.save([insert(saga) for saga in sagas])

        assert await store.claim_due(T0, 10, owner="a", lease=LEASE) == []

    async def test_claim_due_with_no_room_claims_nothing(self, store: SagaRepository) -> None:
        ids = await self._insert_due(store, 1)

        assert await store.claim_due(T0, 0, owner="a", lease=LEASE) == []
        assert [
            saga.saga_id for saga in await store.claim_due(T0, 1, owner="b", lease=LEASE)
        ] == ids

    # ------------------------------------------------------------------ outbox

    async def _fill_outbox(self, store: SagaRepository) -> None:
        """saga-1 writes m-1 then m-2; saga-2 writes m-3 after them."""
        await store.save(
            [
                insert(
                    make_instance("saga-1"),
                    outbox=[make_envelope("m-1", "saga-1"), make_envelope("m-2", "saga-1")],
                )
            ]
        )
        await store.save([insert(make_instance("saga-2"), outbox=[make_envelope("m-3", "saga-2")])])

    async def test_claim_returns_unsent_records_oldest_first_up_to_limit(
        self, store: SagaRepository
    ) -> None:
        await self._fill_outbox(store)

        claimed = await store.claim(owner="relay-a", limit=2, lease=LEASE, now=T0)

        assert [record.envelope.message_id for record in claimed] == ["m-1", "m-2"]
        assert [record.saga_id for record in claimed] == ["saga-1", "saga-1"]
        assert claimed[0].id < claimed[1].id
        assert all(record.attempts == 0 for record in claimed)

    async def test_claimed_records_carry_the_envelope_unchanged(
        self, store: SagaRepository
    ) -> None:
        envelope = make_envelope(
            "m-1",
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
            body='{"note": "größe ✓"}'.encode(),
        )
        await store.save([insert(make_instance(), outbox=[envelope])])

        [record] = await store.claim(owner="relay-a", limit=10, lease=LEASE, now=T0)

        assert record.envelope == envelope
        assert record.envelope.timestamp.utcoffset() == timedelta(0)

    async def test_a_lease_held_by_another_owner_hides_the_record_and_later_ones_of_its_saga(
        self, store: SagaRepository
    ) -> None:
        await self._fill_outbox(store)
        await store.claim(owner="relay-a", limit=1, lease=LEASE, now=T0)

        claimed = await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0)

        assert [record.envelope.message_id for record in claimed] == ["m-3"]

    async def test_an_expired_lease_makes_the_record_claimable_again(
        self, store: SagaRepository
    ) -> None:
        await self._fill_outbox(store)
        await store.claim(owner="relay-a", limit=10, lease=LEASE, now=T0)
        assert await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0) == []

        claimed = await store.claim(
            owner="relay-b", limit=10, lease=LEASE, now=T0 + LEASE + timedelta(seconds=1)
        )

        assert [record.envelope.message_id for record in claimed] == ["m-1", "m-2", "m-3"]

    async def test_mark_sent_removes_records_from_pending_and_from_later_claims(
        self, store: SagaRepository
    ) -> None:
        await self._fill_outbox(store)
        assert await store.pending_count() == 3
        claimed = await store.claim(owner="relay-a", limit=1, lease=LEASE, now=T0)

        await store.mark_sent([record.id for record in claimed], now=T0)

        assert await store.pending_count() == 2
        later = T0 + LEASE * 2
        remaining = await store.claim(owner="relay-b", limit=10, lease=LEASE, now=later)
        assert [record.envelope.message_id for record in remaining] == ["m-2", "m-3"]

    async def test_a_released_record_is_claimable_only_at_retry_at_with_attempts_incremented(
        self, store: SagaRepository
    ) -> None:
        await self._fill_outbox(store)
        [first] = await store.claim(owner="relay-a", limit=1, lease=LEASE, now=T0)
        retry_at = T0 + timedelta(seconds=10)

        await store.release([first.id], retry_at=retry_at, error="broker nacked")

        before = await store.claim(
            owner="relay-a", limit=10, lease=LEASE, now=retry_at - timedelta(seconds=1)
        )
        assert [record.envelope.message_id for record in before] == ["m-3"]
        at_retry = await store.claim(owner="relay-b", limit=1, lease=LEASE, now=retry_at)
        assert [(record.envelope.message_id, record.attempts) for record in at_retry] == [
            ("m-1", 1)
        ]
        assert await store.pending_count() == 3

    async def test_each_release_increments_attempts(self, store: SagaRepository) -> None:
        await store.save([insert(make_instance(), outbox=[make_envelope("m-1")])])
        now = T0
        for _ in range(2):
            [record] = await store.claim(owner="relay", limit=1, lease=LEASE, now=now)
            now += timedelta(seconds=1)
            await store.release([record.id], retry_at=now, error="boom")

        [record] = await store.claim(owner="relay", limit=1, lease=LEASE, now=now)

        assert record.attempts == 2

    # ------------------------------------------------------------------ outbox hand-off

    async def test_save_leased_writes_like_save_and_returns_the_records_it_leased_in_order(
        self, store: SagaRepository
    ) -> None:
        handoff = _handoff(store)
        instance = make_instance()
        envelopes = [make_envelope("m-1"), make_envelope("m-2")]

        leased = await handoff.save_leased(
            [insert(instance, outbox=envelopes, inbox=InboxEntry("orchestrator", "in-1"))],
            owner="relay-a",
            until=T0 + LEASE,
        )

        assert [record.envelope for record in leased] == envelopes
        assert leased[0].id < leased[1].id
        assert {record.saga_id for record in leased} == {"saga-1"}
        assert all(record.created_at == instance.updated_at for record in leased)
        assert await store.load("saga-1") == instance
        assert await store.is_processed("orchestrator", "in-1")
        assert len(await store.history("saga-1")) == 1
        assert await store.pending_count() == 2

    async def test_records_leased_at_save_are_the_owners_until_the_lease_passes(
        self, store: SagaRepository
    ) -> None:
        leased = await _handoff(store).save_leased(
            [insert(make_instance(), outbox=[make_envelope("m-1")])],
            owner="relay-a",
            until=T0 + LEASE,
        )

        assert await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0) == []
        mine = await store.claim(owner="relay-a", limit=10, lease=LEASE, now=T0)
        assert [record.id for record in mine] == [record.id for record in leased]
        # The owner died without publishing: once the lease has passed, anyone takes them.
        later = T0 + LEASE + timedelta(seconds=1)
        taken = await store.claim(owner="relay-b", limit=10, lease=LEASE, now=later)
        assert [record.envelope.message_id for record in taken] == ["m-1"]

    async def test_save_leased_leases_nothing_while_an_earlier_record_of_the_saga_is_not_the_owners(
        self, store: SagaRepository
    ) -> None:
        handoff = _handoff(store)
        instance = make_instance()
        await store.save([insert(instance, outbox=[make_envelope("m-1")])])  # unleased

        leased = await handoff.save_leased(
            [update(instance, outbox=[make_envelope("m-2")])], owner="relay-a", until=T0 + LEASE
        )

        assert leased == []
        claimed = await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0)
        assert [record.envelope.message_id for record in claimed] == ["m-1", "m-2"]

    async def test_save_leased_leases_when_every_earlier_unsent_record_is_the_owners_or_sent(
        self, store: SagaRepository
    ) -> None:
        handoff = _handoff(store)
        v1 = make_instance()
        v2, v3 = (v1.model_copy(update={"version": n}) for n in (2, 3))
        [first] = await handoff.save_leased(
            [insert(v1, outbox=[make_envelope("m-1")])], owner="relay-a", until=T0 + LEASE
        )
        # m-1 is unsent but relay-a's: relay-a holds every unsent message of the saga.
        [second] = await handoff.save_leased(
            [update(v1, outbox=[make_envelope("m-2")])], owner="relay-a", until=T0 + LEASE
        )
        await store.mark_sent([first.id], now=T0)
        # relay-b takes m-2 over once its lease has passed: relay-a no longer holds it.
        await store.claim(owner="relay-b", limit=10, lease=LEASE, now=T0 + 2 * LEASE)
        assert (
            await handoff.save_leased(
                [update(v2, outbox=[make_envelope("m-3")])], owner="relay-a", until=T0 + LEASE
            )
            == []
        )
        await store.mark_sent([second.id], now=T0)
        [third] = await store.claim(owner="relay-a", limit=10, lease=LEASE, now=T0 + 2 * LEASE)
        await store.mark_sent([third.id], now=T0)

        # Everything earlier is sent: the new record is leased again.
        [fourth] = await handoff.save_leased(
            [update(v3, outbox=[make_envelope("m-4")])], owner="relay-a", until=T0 + LEASE
        )

        assert [first.envelope.message_id, second.envelope.message_id] == ["m-1", "m-2"]
        assert third.envelope.message_id == "m-3"
        assert fourth.envelope.message_id == "m-4"

    async def test_save_leased_refuses_a_stale_version_or_a_duplicate_and_writes_nothing(
        self, store: SagaRepository
    ) -> None:
        handoff = _handoff(store)
        instance = make_instance()
        await store.save([insert(instance, inbox=InboxEntry("orchestrator", "in-1"))])

        with pytest.raises(ConcurrencyConflict):
            await handoff.save_leased(
                [insert(instance, outbox=[make_envelope("m-1")])],
                owner="relay-a",
                until=T0 + LEASE,
            )
        with pytest.raises(DuplicateMessage):
            await handoff.save_leased(
                [
                    update(
                        instance,
                        outbox=[make_envelope("m-2")],
                        inbox=InboxEntry("orchestrator", "in-1"),
                    )
                ],
                owner="relay-a",
                until=T0 + LEASE,
            )

        assert await store.pending_count() == 0
        assert await store.load("saga-1") == instance

    async def test_save_leased_in_a_batch_leases_each_sagas_records(
        self, store: SagaRepository
    ) -> None:
        handoff = _handoff(store)
        await store.save([insert(make_instance("saga-2"), outbox=[make_envelope("x", "saga-2")])])

        leased = await handoff.save_leased(
            [
                insert(make_instance("saga-1"), outbox=[make_envelope("a", "saga-1")]),
                update(make_instance("saga-2"), outbox=[make_envelope("b", "saga-2")]),
                insert(make_instance("saga-3"), outbox=[make_envelope("c", "saga-3")]),
            ],
            owner="relay-a",
            until=T0 + LEASE,
        )

        assert [record.envelope.message_id for record in leased] == ["a", "c"]

    # ------------------------------------------------------------------ round trips

    async def test_saga_data_round_trips_as_json(self, store: SagaRepository) -> None:
        data = {
            "nested": {"lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": None}]},
            "unicode": "Zürich → 東京 ✓ 🚚",
            "amount": "12.30",
            "tiny": "0.000000001",
            "flag": True,
            "ratio": 0.25,
            "big": 2**53,
            "empty": {},
            "at": "2030-01-01T12:00:00Z",
        }
        instance = make_instance(data=data)

        await store.save([insert(instance)])

        loaded = await store.load("saga-1")
        assert loaded is not None
        assert loaded.data == data
        assert loaded.data["amount"] == "12.30"

    async def test_datetimes_come_back_aware_in_utc(self, store: SagaRepository) -> None:
        moment = datetime(2030, 1, 1, 14, 0, 0, 123456, tzinfo=UTC)
        instance = make_instance(
            updated_at=moment,
            deadline_at=moment + timedelta(seconds=5),
            saga_deadline_at=moment + timedelta(minutes=5),
        )

        await store.save([insert(instance)])

        loaded = await store.load("saga-1")
        assert loaded is not None
        moments = [
            loaded.created_at,
            loaded.updated_at,
            loaded.deadline_at,
            loaded.saga_deadline_at,
            loaded.steps[0].started_at,
        ]
        for loaded_moment in moments:
            assert loaded_moment is not None
            assert loaded_moment.utcoffset() == timedelta(0)
        assert loaded == instance

    async def test_a_saga_with_trace_context_error_and_step_results_round_trips(
        self, store: SagaRepository
    ) -> None:
        error = ErrorInfo(code="out_of_stock", message="no «A-1» left", retryable=False)
        instance = make_instance(
            status=SagaStatus.COMPENSATING,
            current_step=1,
            attempt=4,
            attempt_base=2,
            wait=WaitKind.RETRY,
            deadline_at=T0 + timedelta(seconds=3),
            error=error,
            correlation_id="order-42",
            trace_context={
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "vendor=value",
            },
            steps=(
                StepState(
                    name="reserve",
                    status=StepStatus.COMPENSATING,
                    attempts=1,
                    compensation_attempts=2,
                    result={"reservation": "r-1"},
                    started_at=T0,
                    finished_at=T0 + timedelta(seconds=1),
                ),
                StepState(name="pay", status=StepStatus.FAILED, attempts=3, error=error),
            ),
        )

        await store.save([insert(instance)])

        assert await store.load("saga-1") == instance
        assert await store.get("saga-1") == instance
