"""The store contract, run against the shipped in-memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sagas_abstractions import SagaRepository, StoreError
from sagas_core.testing import InMemorySagaStore
from tests.contracts.store_contract import SagaStoreContract, insert, make_instance


class TestInMemoryStore(SagaStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[SagaRepository]:
        yield InMemorySagaStore()  # noqa: PT022 - same shape as the contract fixture

    async def test_an_injected_save_failure_writes_nothing(self) -> None:
        store = InMemorySagaStore()
        store.fail_next_saves()

        with pytest.raises(StoreError):
            await store.save([insert(make_instance())])

        assert await store.load("saga-1") is None
        await store.save([insert(make_instance())])
        assert await store.load("saga-1") is not None

    def test_implements_the_repository_protocol(self) -> None:
        assert isinstance(InMemorySagaStore(), SagaRepository)
