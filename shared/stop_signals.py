"""Stop signals that arrive while a service is still starting, before its event loop runs.

Python's default SIGINT handler raises KeyboardInterrupt wherever the process is, often in the
middle of an import: a traceback for PM2's logs, or, when a library's import catches it, a
stop that is lost (the process then runs on until PM2's SIGKILL). Instead the signal is noted
here (stdlib only, so this runs before any heavy import), and `run_until_signalled` stops the
service as soon as its loop runs.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["STOP_SIGNALS", "held", "hold"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held: list[int] = []


def hold() -> None:
    """Note SIGINT and SIGTERM from now on instead of acting on them."""

    def note(sig: int, frame: FrameType | None) -> None:
        _held.append(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, note)


def held() -> int | None:
    """The first stop signal noted since hold(), if any."""
    return _held[0] if _held else None
