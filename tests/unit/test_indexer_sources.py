"""Tests of the contracts the indexer follows, as built from its settings."""

from __future__ import annotations

import structlog

from indexer.service import sources
from shared.indexer_settings import IndexerSettings

FACTORY = "0x169b4019fc12c5bd43bfa5d830fd01a678df6a15"


def test_no_factory_configured_is_warned_about() -> None:
    """An empty MARKET_FACTORY_ADDRESS is valid but indexes no market: the indexer says so."""
    with structlog.testing.capture_logs() as events:
        assert sources(IndexerSettings.model_validate({})).factories == frozenset()
        assert sources(
            IndexerSettings.model_validate({"MARKET_FACTORY_ADDRESS": FACTORY})
        ).factories == frozenset({FACTORY})
    warned = [e["event"] for e in events if e["log_level"] == "warning"]
    assert warned == [
        "no factory configured: MARKET_FACTORY_ADDRESS is empty, no market is indexed"
    ]
