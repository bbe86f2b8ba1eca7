"""``python -m samples.order_api``: serve the order API with uvicorn on 127.0.0.1:8000."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from sagas_core.settings import SettingsError, load_settings
from sagas_core.worker import configure_logging
from samples.order_api.app import build_host, create_app

HOST_ENV = "ORDER_API_HOST"
"""The interface to listen on when ``--host`` is not given (default ``127.0.0.1``)."""

PORT_ENV = "ORDER_API_PORT"
"""The port to listen on when ``--port`` is not given (default ``8000``)."""


def main(argv: list[str] | None = None) -> int:
    """Serve the API until Ctrl-C or SIGTERM; exit status 2 on a wrong setting."""
    parser = argparse.ArgumentParser(
        prog="python -m samples.order_api",
        description="Serve the order API: POST /orders starts an order saga, "
        "GET /orders/{saga_id} shows it. State: SAGAS_DATABASE_URL, else the embedded SQLite file.",
    )
    parser.add_argument(
        "--host", default=os.environ.get(HOST_ENV, "127.0.0.1"), help=f"env {HOST_ENV}"
    )
    # A string default goes through type=int too, so a bad ORDER_API_PORT fails like a bad --port.
    parser.add_argument(
        "--port", type=int, default=os.environ.get(PORT_ENV, "8000"), help=f"env {PORT_ENV}"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(build_host(settings))
    uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
