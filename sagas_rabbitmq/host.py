"""Run participants as a process of their own over RabbitMQ.

```console
$ python -m sagas_rabbitmq.host samples.order_processing.services:inventory --prefix sagas
```

The target is ``module:attribute``, where the attribute is a
:class:`~sagas_core.Participant`, a list of them, or a function (sync or async) without
arguments that returns one or a list. The process consumes each participant's destination,
prints ``ready`` on stdout once every consumer is registered, and on SIGTERM or SIGINT stops
consuming, lets the commands in flight finish (bounded) and exits with status 0.

Settings come from the options, else from ``SAGAS_AMQP_URL``, ``SAGAS_RABBITMQ_PREFIX``,
``SAGAS_RABBITMQ_DELIVERY_LIMIT`` and ``SAGAS_RABBITMQ_QUORUM`` (``0`` for classic queues).
The standard ``OTEL_*`` variables turn on OpenTelemetry export
(:func:`sagas_core.telemetry.configure_from_env`; service name ``sagas-participants`` unless
``OTEL_SERVICE_NAME`` says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sagas_abstractions import SagaError
from sagas_core.host import import_target
from sagas_core.participant import Participant
from sagas_core.runtime import tune_gc
from sagas_core.telemetry import configure_from_env
from sagas_rabbitmq.bus import RabbitBus
from sagas_rabbitmq.settings import RabbitSettings

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["load_participants", "main", "serve"]

_log = logging.getLogger("sagas.rabbitmq.host")

_DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


async def load_participants(target: str) -> list[Participant]:
    """Import ``module:attribute`` and return the participants it names.

    Raises:
        ValueError: The target is malformed or does not name participants.
    """
    value = import_target(target)
    if callable(value) and not isinstance(value, Participant):
        value = value()
        if inspect.isawaitable(value):
            value = await value
    found = [value] if isinstance(value, Participant) else value
    if not isinstance(found, Sequence) or not all(isinstance(p, Participant) for p in found):
        raise ValueError(f"{target} is not a Participant, a list of them, or a factory of those")
    if not found:
        raise ValueError(f"{target} names no participant")
    return list(found)


async def serve(
    participants: Sequence[Participant],
    settings: RabbitSettings,
    *,
    concurrency: int = 8,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Consume the participants' commands until ``stop`` is set (or SIGTERM/SIGINT arrives).

    Raises:
        TransportError: The broker cannot be reached or refuses the topology.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    bus = await RabbitBus.from_settings(settings)
    try:
        for participant in participants:
            await participant.attach(bus, concurrency=concurrency)
        _log.info(
            "serving %s on %s",
            ", ".join(p.destination for p in participants),
            settings.prefix,
        )
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        # Closing cancels the consumers first, then waits for handlers in flight (bounded).
        await bus.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sagas_rabbitmq.host", description="Run saga participants over RabbitMQ."
    )
    parser.add_argument("target", help="module:attribute naming the participant(s)")
    parser.add_argument("--url", default=os.environ.get("SAGAS_AMQP_URL", _DEFAULT_URL))
    parser.add_argument("--prefix", default=os.environ.get("SAGAS_RABBITMQ_PREFIX", "sagas"))
    parser.add_argument(
        "--delivery-limit",
        type=int,
        default=int(os.environ.get("SAGAS_RABBITMQ_DELIVERY_LIMIT", "5")),
    )
    parser.add_argument(
        "--classic",
        action="store_true",
        default=os.environ.get("SAGAS_RABBITMQ_QUORUM", "1") == "0",
        help="classic queues instead of quorum queues",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--group", default="participants")
    parser.add_argument(
        "--no-tune-gc",
        action="store_true",
        help="keep Python's own garbage collector settings (see sagas_core.runtime.tune_gc)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the host; returns the process exit status."""
    options = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    configure_from_env("sagas-participants")  # the standard OTEL_* variables, when they are set
    settings = RabbitSettings(
        url=options.url,
        prefix=options.prefix,
        quorum=not options.classic,
        delivery_limit=options.delivery_limit,
        group=options.group,
    )

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    async def run() -> None:
        participants = await load_participants(options.target)
        if not options.no_tune_gc:
            tune_gc()  # a long-running process, its modules loaded (docs/performance.md)
        await serve(participants, settings, concurrency=options.concurrency, on_ready=ready)

    try:
        asyncio.run(run())
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except SagaError as exc:  # the broker refused us (credentials, permissions): say it once
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
