"""Exceptions shared by the indexer and the broadcaster, all rooted at KektechError."""

from __future__ import annotations

__all__ = ["ChannelError", "ConfigError", "EnvelopeError", "KektechError"]


class KektechError(Exception):
    """Root of every exception this project raises on purpose."""


class ConfigError(KektechError):
    """A setting is missing or invalid, so the service cannot start."""

    variable: str
    reason: str
    missing: bool

    def __init__(self, variable: str, reason: str, *, missing: bool = False) -> None:
        self.variable = variable
        self.reason = reason
        self.missing = missing
        super().__init__(variable, reason)

    def __str__(self) -> str:
        if self.missing:
            return f"missing setting {self.variable}"
        return f"invalid setting {self.variable}: {self.reason}"


class EnvelopeError(KektechError):
    """Bytes or values that are not a valid event envelope."""


class ChannelError(KektechError):
    """A channel name or pattern that a client may not subscribe to."""
