"""Reply affinity: the replies to a process's commands come back to that process.

With several workers in a group, a saga's replies used to land on any of them, so workers took
turns on a saga: each turn a reload (the other worker's copy was stale) and an outbox claim
(the other worker's relay still held the saga's earlier records). A command now asks for its
reply at ``<reply_to>@<instance>``, a queue of the publishing process whose replies expire into
the group's shared queue after ``reply_affinity_ttl``, so a process that dies or stalls loses
nothing: any worker of the group takes them then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sagas_abstractions import Envelope, RouteKind
from sagas_rabbitmq import RabbitBus, RabbitSettings
from sagas_rabbitmq.testing import rabbitmqctl
from tests.integration.rabbitmq.test_rabbit_bus import envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]
GROUP = "sagas.replies.default"  # what test_rabbit_bus.envelope() puts in reply_to


async def _replies(bus: RabbitBus) -> list[Envelope]:
    received: list[Envelope] = []

    async def record(message: Envelope) -> None:
        received.append(message)

    await bus.subscribe(RouteKind.REPLY, GROUP, record, concurrency=8)
    return received


async def _responder(bus: RabbitBus) -> list[Envelope]:
    """A participant: answers every command at its ``reply_to``; returns the commands seen."""
    commands: list[Envelope] = []

    async def answer(command: Envelope) -> None:
        commands.append(command)
        assert command.reply_to is not None
        reply = envelope(RouteKind.REPLY, command.reply_to, message_type="Reserved")
        await bus.publish([reply.model_copy(update={"correlation_id": command.message_id})])

    await bus.subscribe(RouteKind.COMMAND, "inventory", answer, concurrency=8)
    return commands


async def test_a_command_asks_for_its_reply_at_the_process_that_published_it(
    connect: BusFactory,
) -> None:
    worker = await connect()
    replies = await _replies(worker)
    commands = await _responder(await connect(group="participants"))

    sent = envelope(RouteKind.COMMAND, "inventory")
    await worker.publish([sent])

    await eventually(lambda: len(replies) == 1)
    assert commands[0].reply_to == f"{GROUP}@{worker.instance}"
    assert sent.reply_to == GROUP  # the envelope (and so the outbox row) keeps the group's
    assert replies[0].key == GROUP  # handled as a reply to the address asked for
    assert replies[0].correlation_id == sent.message_id


async def test_replies_go_back_to_the_worker_that_sent_the_command(connect: BusFactory) -> None:
    first, second = await connect(), await connect()
    to_first, to_second = await _replies(first), await _replies(second)
    await _responder(await connect(group="participants"))

    from_first = [envelope(RouteKind.COMMAND, "inventory") for _ in range(20)]
    from_second = [envelope(RouteKind.COMMAND, "inventory") for _ in range(20)]
    await asyncio.gather(first.publish(from_first), second.publish(from_second))

    await eventually(lambda: len(to_first) + len(to_second) == 40)
    assert sorted(str(r.correlation_id) for r in to_first) == sorted(
        m.message_id for m in from_first
    )
    assert sorted(str(r.correlation_id) for r in to_second) == sorted(
        m.message_id for m in from_second
    )


async def test_replies_for_a_worker_that_stopped_move_to_the_group_after_the_ttl(
    connect: BusFactory,
) -> None:
    gone = await connect(reply_affinity_ttl=0.5, reply_affinity_expires=60)
    gone_replies = await _replies(gone)
    survivor = await connect()
    survivor_replies = await _replies(survivor)
    participant = await connect(group="participants")

    commands = [envelope(RouteKind.COMMAND, "inventory") for _ in range(10)]
    await gone.publish(commands)
    await gone.close()  # the worker dies with its commands in flight
    await _responder(participant)  # the participant answers them after that

    await eventually(lambda: len(survivor_replies) == 10, timeout=15)
    assert gone_replies == []
    assert sorted(str(r.correlation_id) for r in survivor_replies) == sorted(
        m.message_id for m in commands
    )


async def test_without_affinity_commands_keep_the_group_address(connect: BusFactory) -> None:
    worker = await connect(reply_affinity=False)
    replies = await _replies(worker)
    commands = await _responder(await connect(group="participants"))

    await worker.publish([envelope(RouteKind.COMMAND, "inventory")])

    await eventually(lambda: len(replies) == 1)
    assert commands[0].reply_to == GROUP
    assert not any(".own." in name for name in worker.declared_queues)


async def test_a_command_for_another_reply_address_is_left_alone(connect: BusFactory) -> None:
    worker = await connect()
    await _replies(worker)
    commands = await _responder_without_answer(await connect(group="participants"))

    await worker.publish([envelope(RouteKind.COMMAND, "inventory", reply_to="billing.replies")])

    await eventually(lambda: len(commands) == 1)
    assert commands[0].reply_to == "billing.replies"


async def _responder_without_answer(bus: RabbitBus) -> list[Envelope]:
    commands: list[Envelope] = []

    async def record(command: Envelope) -> None:
        commands.append(command)

    await bus.subscribe(RouteKind.COMMAND, "inventory", record)
    return commands


def test_the_queue_must_outlive_the_ttl_by_far() -> None:
    with pytest.raises(ValueError, match="reply_affinity_expires"):
        RabbitSettings(reply_affinity_ttl=30, reply_affinity_expires=60)
    with pytest.raises(ValueError, match="reply_affinity_ttl"):
        RabbitSettings(reply_affinity_ttl=0)


def _own_reply_queues(prefix: str) -> list[str]:
    names = rabbitmqctl("list_queues", "name", "--no-table-headers").split()
    return sorted(name for name in names if name.startswith(f"{prefix}.") and ".own." in name)


@pytest.mark.usefixtures("needs_rabbitmqctl")
@pytest.mark.parametrize("instance_id", [None, "worker-0"])
async def test_a_restarted_worker_with_an_instance_id_takes_up_its_own_reply_queue_again(
    connect: BusFactory, prefix: str, instance_id: str | None
) -> None:
    participant = await connect(group="participants")
    first = await connect(instance_id=instance_id)
    await _replies(first)
    address = f"{GROUP}@{first.instance}"
    await first.close()  # a crash: its queue stays (until x-expires)
    waiting = envelope(RouteKind.REPLY, address, message_type="Reserved")
    await participant.publish([waiting])  # a reply to a command of the stopped process

    second = await connect(instance_id=instance_id)
    replies = await _replies(second)
    await eventually(lambda: len(replies) == 1)  # from its own queue, or the group's after the TTL

    assert replies[0].message_id == waiting.message_id
    own = _own_reply_queues(prefix)
    if instance_id is None:
        assert len(own) == 2  # each incarnation left a queue of its own
    else:
        assert own == [second.topology.affinity_queue(GROUP, instance_id)]  # the same queue
        assert second.instance == first.instance == instance_id


async def test_two_live_workers_with_one_instance_id_share_the_queue_and_warn(
    connect: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = await connect(instance_id="worker-0")
    to_first = await _replies(first)
    second = await connect(instance_id="worker-0")
    to_second = await _replies(second)
    await _responder(await connect(group="participants"))

    sent = [envelope(RouteKind.COMMAND, "inventory") for _ in range(10)]
    await first.publish(sent)

    await eventually(
        lambda: len(to_first) + len(to_second) == 10
    )  # nothing lost, either takes them
    assert "instance_id 'worker-0' is not unique" in caplog.text
