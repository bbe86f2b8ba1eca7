"""The order saga as a host for ``sagas worker samples.order_processing.host:host``.

With ``SAGAS_AMQP_URL`` set, the participants run as their own processes
(``sagas participant samples.order_processing.services:inventory`` ...); without it the bus is
in-process and this host serves them too. State lives in ``SAGAS_DATABASE_URL``, else the
embedded SQLite file.
"""

from __future__ import annotations

from sagas_core import SagaHost
from sagas_core.settings import load_settings
from samples.order_processing.saga import order_saga
from samples.order_processing.services import Ledger, build_participants


def host() -> SagaHost:
    """Build the sample host from the ``SAGAS_*`` settings."""
    settings = load_settings()
    builder = SagaHost.builder().use_settings(settings).add_saga(order_saga)
    if settings.amqp_url is None:
        participants, *_ = build_participants(Ledger())
        for participant in participants:
            builder.add_participant(participant)
    return builder.build()
