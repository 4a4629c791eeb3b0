"""Benchmarks: run by hand against real local services, not part of the test suite."""
