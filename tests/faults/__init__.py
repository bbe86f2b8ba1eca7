"""Fault-injection suite: the order saga under kills, disconnects and duplicates (issue 8)."""
