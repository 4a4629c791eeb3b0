"""Test helpers that stand in for the outside world: servers, not mocks."""
