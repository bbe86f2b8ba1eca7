"""The long-lived worker: run a host until SIGTERM/SIGINT, then shut down gracefully.

The first signal stops consuming, lets in-flight work finish within the grace period, flushes
the outbox and closes connections (exit status 0). A second signal exits at once (status 130).
A host that cannot start (broker or database unreachable) exits with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagas_core.host import SagaHost

__all__ = ["JsonFormatter", "configure_logging", "run_worker", "serve_health"]

_log = logging.getLogger("sagas.worker")

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            {
                key: value
                for key, value in vars(record).items()
                if key not in _STANDARD_ATTRS and not key.startswith("_")
            }
        )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def serve_health(host: SagaHost, port: int) -> asyncio.Server:
    """Serve ``GET /health`` (the process runs) and ``GET /ready`` (it can work) on 127.0.0.1."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.split(b" ")  # b"GET /ready HTTP/1.1"
            path = parts[1].decode() if len(parts) > 2 else ""  # noqa: PLR2004
            if path == "/health":
                status, body = 200, "ok"
            elif path == "/ready":
                ok = await host.ready()
                status, body = (200, "ready") if ok else (503, "not ready")
            else:
                status, body = 404, "not found"
            reason = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port)


async def run_worker(host: SagaHost, *, ready_message: bool = True) -> int:
    """Run ``host`` until a stop signal; returns the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(number: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            _log.warning("second signal: exiting now")
            os._exit(130)
        _log.info("signal %s: shutting down gracefully", signal.Signals(number).name)
        stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    health: asyncio.Server | None = None
    try:
        try:
            await host.start()
        except Exception as exc:  # noqa: BLE001 - any start failure is fatal: say why, exit 1
            _log.critical("worker could not start: %s", exc, exc_info=True)
            return 1
        port = host.settings.health_port
        if port is not None:
            health = await serve_health(host, port)
        _log.info(
            "worker ready",
            extra={"sagas": [s.name for s in host.sagas], "settings": host.settings.describe()},
        )
        if ready_message:
            print("ready", flush=True)  # noqa: T201 - a line supervisors and tests wait for
        await stop.wait()
        await host.stop()
        _log.info("worker stopped")
        return 0
    finally:
        if health is not None:
            health.close()
            with contextlib.suppress(Exception):
                await health.wait_closed()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
