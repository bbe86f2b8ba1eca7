"""The bench's participant process: ``python -m sagas_rabbitmq.host``, on uvloop when installed.

Run as ``python -m bench.support.participant_host [host options]``; the options are those of
``sagas_rabbitmq.host``. ``BENCH_LOOP=asyncio`` keeps asyncio's own event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys

from sagas_rabbitmq.host import main


def use_fast_loop() -> bool:
    """Make ``asyncio.run`` use uvloop, unless told not to or it is not installed."""
    if os.environ.get("BENCH_LOOP", "auto") == "asyncio":
        return False
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


if __name__ == "__main__":
    use_fast_loop()
    sys.exit(main())
