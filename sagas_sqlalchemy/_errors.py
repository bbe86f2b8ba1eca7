"""Which driver errors mean the database cannot be reached, as opposed to a statement it refused.

The difference decides who failed: a database that is down, restarting, out of connections or
that dropped the connection fails every message alike (the worker's failure, raised as
:class:`~sagas_abstractions.StoreUnavailable`, which buses do not count against a message);
a statement the database refused fails for what the message carried (a plain
:class:`~sagas_abstractions.StoreError`).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy.exc

from sagas_abstractions import StoreError, StoreUnavailable

__all__ = ["store_error", "unavailable"]

# SQLSTATE classes 08 (connection exception) and 53 (insufficient resources: too many
# connections, out of memory or disk), and the shutdown states of class 57.
_UNAVAILABLE_CLASSES = frozenset({"08", "53"})
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, starting up


def _link_error_types() -> tuple[type[BaseException], ...]:
    """The errors of psycopg (optional) that, without an SQLSTATE, mean the link failed."""
    try:
        import psycopg  # noqa: PLC0415 - the postgres extra
    except ImportError:  # pragma: no cover - depends on the installed extras
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


_LINK_ERRORS = _link_error_types()


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached (rather than refused a statement)."""
    if isinstance(error, sqlalchemy.exc.TimeoutError):
        return True  # the pool had no connection to spare in time
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if isinstance(error, OSError):
        return True  # refused, reset, unreachable
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(code, str):
        return code[:2] in _UNAVAILABLE_CLASSES or code in _UNAVAILABLE_STATES
    # No SQLSTATE: connecting failed, or the server closed the connection.
    return isinstance(error, _LINK_ERRORS)


def store_error(message: str, error: BaseException, **context: Any) -> StoreError:
    """The :class:`StoreError` (or :class:`StoreUnavailable`) for ``error``; chain it with from."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else "no details"
    kind = StoreUnavailable if unavailable(error) else StoreError
    return kind(f"{message}: {type(error).__name__}: {first}", **context)
