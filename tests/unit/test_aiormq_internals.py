"""The installed aiormq still has every internal ``sagas_rabbitmq._aiormq`` relies on.

A dependency bump that removes or renames one fails here, naming it, instead of turning into a
slower path (batch publishing, ack batching) or a refusal to connect (consuming) in production.
Also: the capability check that ``RabbitBus`` runs on connect refuses or warns loudly.

No broker: the channel inspected is a real ``aiormq.Channel`` on a stand-in connection that
carries only what the channel's constructor reads.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiormq
import aiormq.base
import pytest

from sagas_rabbitmq import _aiormq
from sagas_rabbitmq._aiormq import AiormqUnsupportedError, Feature

_FRAME_MAX = 131_072
_ROOT = Path(__file__).parents[2]


class _Connection(aiormq.base.Base):
    """What ``aiormq.Channel.__init__`` reads of its connection, and nothing more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.publisher_confirms = True
        self.is_opened = False  # closing the channel sends nothing
        self.connection_tune = SimpleNamespace(frame_max=_FRAME_MAX, heartbeat=0)
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()

    async def _on_close(self, exc: BaseException | type[BaseException] | None = None) -> None:
        return None

    def __str__(self) -> str:
        return "stand-in connection"


@pytest.fixture
async def channel() -> AsyncIterator[aiormq.Channel]:
    """An aiormq channel as the bus's publishing channel is opened (confirms, returns raise)."""
    connection = _Connection(asyncio.get_running_loop())
    try:
        opened = aiormq.Channel(connection, 1, publisher_confirms=True, on_return_raises=True)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure: the constructor changed
        pytest.fail(
            f"aiormq {_aiormq.installed_aiormq()}: aiormq.Channel(connection, number, "
            f"publisher_confirms=..., on_return_raises=...) failed ({exc!r}); this test's "
            "stand-in connection needs updating before the internals can be checked",
            pytrace=False,
        )
    yield opened
    await opened.close()
    await connection.close()


def test_the_installed_aiormq_has_every_internal_sagas_relies_on(
    channel: aiormq.Channel,
) -> None:
    internals = _aiormq.inspect_channel(channel)

    gone = [internals.describe(feature) for feature in Feature if internals.missing.get(feature)]
    assert not gone, "\n".join(
        [
            "The installed aiormq no longer offers what sagas_rabbitmq/_aiormq.py uses:",
            *gone,
            (
                "Adapt sagas_rabbitmq/_aiormq.py to this aiormq (docs/operations.md, 'The "
                "aiormq internals'), or keep aiormq within the bound of pyproject.toml."
            ),
        ]
    )
    assert internals.batch_publish
    assert internals.ack_batching
    assert internals.consuming


def test_the_stand_in_channel_is_split_as_the_bus_expects(channel: aiormq.Channel) -> None:
    # The body frames of BatchPublisher are split at max_content_size, as aiormq splits them.
    assert channel.max_content_size == _FRAME_MAX - channel.CONTENT_FRAME_SIZE
    body = b"x" * (2 * channel.max_content_size + 10)
    ours = _aiormq._body_frames(body, channel.max_content_size, channel.number)
    theirs = [
        aiormq.abc.ChannelFrame.marshall(channel.number, [frame]).payload
        for frame in channel._split_body(body)
    ]
    assert ours == theirs
    assert _aiormq._body_frames(b"", channel.max_content_size, channel.number) == []


def test_pyproject_bounds_aiormq_to_the_supported_versions() -> None:
    pyproject = tomllib.loads((_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    rabbitmq = pyproject["project"]["optional-dependencies"]["rabbitmq"]
    assert f"aiormq{_aiormq.SUPPORTED_AIORMQ}" in rabbitmq


@pytest.mark.parametrize("module", ["bus.py", "consumer.py"])
def test_the_bus_and_the_consumer_do_not_import_aiormq_or_pamqp(module: str) -> None:
    # Whatever goes below aio-pika's public API belongs in _aiormq.py, where the check covers it.
    tree = ast.parse((_ROOT / "sagas_rabbitmq" / module).read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert not imported & {"aiormq", "pamqp"}


def test_every_feature_names_what_it_needs() -> None:
    missing = _aiormq.inspect_channel(object()).missing
    assert set(missing) == set(Feature)
    assert "Channel.delivery_tag: int" in missing[Feature.BATCH_PUBLISH]
    assert "Channel.write_queue: asyncio.Queue" in missing[Feature.ACK_BATCHING]
    assert "Channel.on_consumer_cancel_callbacks: set" in missing[Feature.CONSUMING]


async def test_connecting_without_what_consuming_needs_fails_naming_it_and_the_versions(
    channel: aiormq.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(channel, "on_consumer_cancel_callbacks")

    with pytest.raises(AiormqUnsupportedError) as raised:
        _aiormq.check(channel)

    message = str(raised.value)
    assert "Channel.on_consumer_cancel_callbacks: set" in message
    assert f"aiormq{_aiormq.SUPPORTED_AIORMQ}" in message
    assert "consuming" in message


async def test_without_what_batch_publishing_needs_the_slower_path_is_taken_with_a_warning(
    channel: aiormq.Channel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(channel, "message_id_delivery_tag")

    with caplog.at_level(logging.WARNING, logger="sagas.rabbitmq"):
        internals = _aiormq.check(channel)

    assert not internals.batch_publish
    assert internals.ack_batching
    assert internals.consuming
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "Channel.message_id_delivery_tag: dict" in record.getMessage()
    assert f"aiormq{_aiormq.SUPPORTED_AIORMQ}" in record.getMessage()
    assert "one message at a time" in record.getMessage()


async def test_without_what_ack_batching_needs_acks_go_one_by_one_with_a_warning(
    channel: aiormq.Channel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aiormq.abc.ChannelFrame, "marshall", None)

    with caplog.at_level(logging.WARNING, logger="sagas.rabbitmq"):
        internals = _aiormq.check(channel)

    assert internals.batch_publish
    assert not internals.ack_batching
    [record] = caplog.records
    assert "ChannelFrame.marshall()" in record.getMessage()
    assert "acking one message at a time" in record.getMessage()


async def test_a_supported_aiormq_passes_the_check_silently(
    channel: aiormq.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="sagas.rabbitmq"):
        internals = _aiormq.check(channel)

    assert internals.missing == {}
    assert caplog.records == []
