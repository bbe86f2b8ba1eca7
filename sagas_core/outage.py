"""Hold a subscription's deliveries while the store or broker its handler needs is unreachable.

A handler that raises :class:`~sagas_abstractions.Unavailable` (the store cannot be reached, or
its reply could not be published because the broker connection is down or recovering) failed
for a reason of the worker's, not of the message's: handing the message back would spend its
delivery limit (a quorum queue counts every return) and a short outage would dead-letter genuine
messages, in a tight loop when the consuming channel is back before the publishing one. So a
bus keeps the delivery (unacked: the broker sends no more than the prefetch meanwhile) and
tries it again once the handler gets through. One delivery at a time probes, with backoff; the
others wait for it instead of hammering what is down, and take their turn again once it
succeeds. The outage is logged when it starts and when it ends, not per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from sagas_abstractions import StoreUnavailable, Unavailable
from sagas_core.retry import ExponentialBackoff

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sagas_abstractions import Envelope, MessageHandler

__all__ = ["LoopFailures", "Outage"]

_log = logging.getLogger("sagas.outage")

_PROBE_BACKOFF = ExponentialBackoff(initial=0.05, maximum=2.0, jitter=0.2)


def _what(exc: Unavailable) -> str:
    """What an outage is of, for its log line."""
    return "store" if isinstance(exc, StoreUnavailable) else "broker"


class Outage:
    """The outage state of one subscription (or of subscriptions sharing a handler).

    Args:
        name: What is consumed, for the log lines.
        backoff: The wait before each probe while what the handler needs is down.

    Attributes:
        outages: Outages seen so far.
        held: Deliveries that met an outage (each counted once per outage).
    """

    def __init__(self, name: str, *, backoff: ExponentialBackoff = _PROBE_BACKOFF) -> None:
        self.name = name
        self.outages = 0
        self.held = 0
        self._backoff = backoff
        self._up = asyncio.Event()
        self._up.set()
        self._probing = False
        self._probes = 0
        self._since = 0.0

    @property
    def down(self) -> bool:
        """Whether the last try found the store or broker unavailable (deliveries are held)."""
        return not self._up.is_set()

    async def handle(self, handler: MessageHandler, envelope: Envelope) -> None:
        """Run ``handler(envelope)``, held while what it needs is unavailable (see :meth:`run`)."""
        if self.down:
            await self.run(partial(handler, envelope))
            return
        try:
            await handler(envelope)
        except Unavailable as exc:
            await self.run(partial(handler, envelope), failed=exc)

    async def run(
        self, attempt: Callable[[], Awaitable[None]], *, failed: Unavailable | None = None
    ) -> None:
        """Run ``attempt`` (one delivery's handler) until it stops raising ``Unavailable``.

        Any other exception (the handler's own failure) is raised at once, as is a
        cancellation (the subscription is closing: the delivery goes back to its queue).

        Args:
            attempt: Handles the delivery once.
            failed: What the delivery's first attempt raised, when it was made already.
        """
        probing = False if failed is None else await self._unavailable(failed, probing=False)
        while True:
            if not probing:
                await self._up.wait()
            try:
                await attempt()
            except Unavailable as exc:
                probing = await self._unavailable(exc, probing=probing)
            except asyncio.CancelledError:
                if probing:
                    self._probing = False
                    self._up.set()  # closing: a waiting delivery takes over (or is cancelled)
                raise
            except BaseException:
                if probing:
                    self._recovered(probing=probing)  # it got through; the handler itself failed
                raise
            else:
                if probing or self.down:
                    self._recovered(probing=probing)
                return

    async def _unavailable(self, exc: Unavailable, *, probing: bool) -> bool:
        """Note the failure; wait before probing again (``True``) or wait for the prober."""
        if not self.down:
            self.outages += 1
            self._probes = 0
            self._since = time.monotonic()
            self._up.clear()
            _log.warning(
                "%s: the %s is unavailable (%s); holding its deliveries, uncounted, and "
                "trying again until it answers",
                self.name,
                _what(exc),
                exc,
            )
        if not probing:
            self.held += 1
            if self._probing:
                return False  # another delivery probes: wait for it
            self._probing = True
        self._probes += 1
        delay = self._backoff.delay(self._probes, self.name).total_seconds()
        _log.debug("%s: still unavailable, probing again in %.2fs", self.name, delay)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._probing = False
            self._up.set()  # closing: a waiting delivery takes over the probing (or is cancelled)
            raise
        return True

    def _recovered(self, *, probing: bool) -> None:
        if probing:
            self._probing = False
        if self.down:
            self._up.set()
            _log.warning(
                "%s: back after %.1fs; %d held deliveries resume",
                self.name,
                time.monotonic() - self._since,
                self.held,
            )
            self.held = 0


class LoopFailures:
    """How a background loop (the outbox relay, the timeout service) reports failed rounds.

    An :class:`~sagas_abstractions.Unavailable` (the store or the broker cannot be reached) is
    an outage, not a bug: one warning when it starts, naming what is unavailable and why, then
    the rounds that fail the same way at debug level, and one warning when a round succeeds
    again. A traceback per poll would bury the one line an operator needs. Anything else is
    logged with its traceback every time.

    Args:
        name: The loop, for the log lines.
        log: Its logger.

    Attributes:
        count: Rounds failed in a row (for the loop's backoff).
    """

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self.count = 0
        self._log = log
        self._outage_since: float | None = None

    def failed(self, exc: Exception) -> None:
        """A round raised ``exc``."""
        self.count += 1
        if not isinstance(exc, Unavailable):
            self._log.error("%s round failed", self.name, exc_info=exc)
            return
        if self._outage_since is not None:
            self._log.debug("%s: still unavailable (%s)", self.name, exc)
            return
        self._outage_since = time.monotonic()
        self._log.warning(
            "%s: the %s is unavailable (%s); trying again with backoff until it answers",
            self.name,
            _what(exc),
            exc,
        )

    def succeeded(self) -> None:
        """A round went through."""
        if self._outage_since is not None:
            self._log.warning(
                "%s: back after %.1fs and %d failed rounds",
                self.name,
                time.monotonic() - self._outage_since,
                self.count,
            )
            self._outage_since = None
        self.count = 0
