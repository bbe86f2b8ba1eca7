"""Shared pieces of the benchmarks: the bench saga, its participants, the worker host."""
