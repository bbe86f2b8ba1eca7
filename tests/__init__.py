"""Test suites of sagas: unit, contracts (per port, run per backend), integration, faults."""
