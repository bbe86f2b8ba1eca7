"""The order saga as a host for ``sagas worker samples.order_processing.host:host``.

With ``SAGAS_AMQP_URL`` set, the participants run as their own processes
(``sagas participant samples.order_processing.services:inventory`` ...); without it the bus is
in-process and this host serves them too. State lives in ``SAGAS_DATABASE_URL``, else the
embedded SQLite file.
"""

from __future__ import annotations

import os

from sagas_core import SagaHost
from sagas_core.settings import load_settings
from samples.order_processing.saga import build_order_saga
from samples.order_processing.services import Ledger, build_participants

SHIPMENT_TIMEOUT_ENV = "SAMPLE_SHIPMENT_TIMEOUT"
"""Seconds per shipment attempt (default 0.3, the demo's); a busy deployment wants more.

Timeouts are not part of the definition's fingerprint, so workers with different values
(or a changed value after a restart) run the same sagas."""


def host() -> SagaHost:
    """Build the sample host from the ``SAGAS_*`` settings."""
    settings = load_settings()
    shipment_timeout = float(os.environ.get(SHIPMENT_TIMEOUT_ENV) or 1.0)
    saga = build_order_saga(shipment_timeout=shipment_timeout)
    builder = SagaHost.builder().use_settings(settings).add_saga(saga)
    if settings.amqp_url is None:
        participants, *_ = build_participants(Ledger())
        for participant in participants:
            builder.add_participant(participant)
    return builder.build()
