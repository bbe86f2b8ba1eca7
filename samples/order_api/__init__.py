"""A FastAPI service that starts order sagas and shows their progress.

Run it with ``python -m samples.order_api`` (see ``README.md`` in this folder).
"""

from samples.order_api.app import build_host, create_app

__all__ = ["build_host", "create_app"]
