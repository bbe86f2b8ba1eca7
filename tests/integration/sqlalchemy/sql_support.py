"""Helpers for the SQL store integration tests.

Every store made here lives in the test's own event loop (engines are never shared across
loops), uses a table prefix nobody else uses, and drops its tables when the test ends.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel

from sagas_abstractions import ReplyMessage, ReplyStatus, SagaInstance, StepKind
from sagas_core import SagaBuilder, fixed
from sagas_core.definition import SagaDefinition
from sagas_sqlalchemy import SqlSagaStore, create_store


def unique_prefix() -> str:
    """A table prefix no other test run uses."""
    return f"sagas_t{uuid.uuid4().hex[:10]}_"


def sqlite_url(directory: Path) -> str:
    """The URL of a SQLite file in ``directory``."""
    return f"sqlite+aiosqlite:///{directory / 'sagas.db'}"


@contextlib.asynccontextmanager
async def sql_store(
    url: str, *, prefix: str | None = None, create: bool = True
) -> AsyncIterator[SqlSagaStore]:
    """A store with its own engine; with ``create`` it makes fresh tables and drops them on exit."""
    store = create_store(url, table_prefix=prefix or unique_prefix(), create_tables=create)
    try:
        await store.initialize()
        yield store
    finally:
        try:
            if create:
                await store.drop_tables()
        finally:
            await store.close()


# ---------------------------------------------------------------------- sagas used by the tests


class Tally(BaseModel):
    """Saga data every step adds to: a lost update would show as a wrong count or trail."""

    count: int = 0
    trail: str = ""


class Bump(BaseModel):
    count: int


class Undo(BaseModel):
    count: int


def long_saga(steps: int) -> SagaDefinition:
    """A saga of ``steps`` remote steps, each compensable."""
    builder = SagaBuilder("long", data=Tally)
    for index in range(steps):
        builder.step(f"s{index}").send(Bump, to="counter").compensate_with(Undo)
    return builder.build()


def flaky_saga(attempts: int, *, destination: str = "counter") -> SagaDefinition:
    """A one-step saga whose step times out after 1 s and is retried ``attempts`` times."""
    return (
        SagaBuilder("flaky", data=Tally)
        .step("call")
        .send(Bump, to=destination)
        .timeout(seconds=1)
        .retry(attempts=attempts, backoff=fixed(1))
        .build()
    )


def success_for(instance: SagaInstance) -> ReplyMessage:
    """The participant's success reply to the saga's current command."""
    step = instance.current_step_name
    assert step is not None
    command_id = f"{instance.saga_id}:{step}:{StepKind.EXECUTE.value}:{instance.attempt}"
    return ReplyMessage(
        message_id=f"{command_id}:reply",
        saga_id=instance.saga_id,
        saga_type=instance.saga_type,
        step=step,
        attempt=instance.attempt,
        kind=StepKind.EXECUTE,
        status=ReplyStatus.SUCCEEDED,
        data={
            "count": instance.data["count"] + 1,
            "trail": instance.data["trail"] + step[1:] + ",",
        },
        in_reply_to=command_id,
        created_at=instance.updated_at,
        reply_token=instance.steps[instance.current_step].reply_token,  # echoed, as participants do
    )


def tokenless(*instances: SagaInstance | None) -> list[SagaInstance | None]:
    """The instances without their steps' reply tokens (random per command, so two runs of the
    same inputs differ in them and in nothing else)."""
    return [
        None
        if instance is None
        else instance.model_copy(
            update={
                "steps": tuple(
                    step.model_copy(update={"reply_token": None}) for step in instance.steps
                )
            }
        )
        for instance in instances
    ]
