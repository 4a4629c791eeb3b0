"""Broadcaster benchmark: `python -m bench.broadcaster.run` (see docs/broadcaster.md)."""
