"""Adapters for third-party libraries, each behind its own extra.

Importing this package imports none of them: each adapter imports its library when it is used,
and says which extra to install when it is missing.
"""

__all__: list[str] = []
