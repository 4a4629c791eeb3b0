"""Fetching the logs of a long block range in chunks sized to what the node accepts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from indexer.errors import RpcRangeTooLarge
from indexer.rpc_results import RawLog, TopicFilter

if TYPE_CHECKING:
    # Only for annotations: indexer.rpc re-exports this module's names.
    from indexer.rpc import RpcClient

__all__ = ["LogRangeSizer", "fetch_logs"]

# Successes in a row after which the sizer tries again a size that was refused before.
PROBE_AFTER = 16


class LogRangeSizer:
    """The eth_getLogs range size: doubles after a success, halves when the node refuses."""

    def __init__(
        self, initial: int, minimum: int, maximum: int, *, probe_after: int = PROBE_AFTER
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(
                f"need 1 <= minimum <= initial <= maximum, got {minimum, initial, maximum}"
            )
        if probe_after < 1:
            raise ValueError("probe_after must be positive")
        self._size = initial
        self._minimum = minimum
        self._maximum = maximum
        # After a refusal, growth stops at the size that worked, so that a fixed provider limit
        # costs one refused request every probe_after chunks instead of every other chunk.
        self._ceiling = maximum
        self._streak = 0
        self._probe_after = probe_after

    @property
    def size(self) -> int:
        """Blocks to ask for in the next eth_getLogs call."""
        return self._size

    @property
    def minimum(self) -> int:
        """The smallest size; a range this small that is refused is an error."""
        return self._minimum

    @property
    def maximum(self) -> int:
        """The largest size."""
        return self._maximum

    def on_success(self) -> None:
        """Grow after a range was answered."""
        self._streak += 1
        if self._streak >= self._probe_after:
            self._streak = 0
            self._ceiling = self._maximum
        self._size = min(self._size * 2, self._ceiling)

    def on_too_large(self, span: int | None = None) -> None:
        """Halve after a range of span blocks (default: size) was refused; raise at the minimum."""
        tried = self._size if span is None else min(span, self._size)
        if tried <= self._minimum:
            raise RpcRangeTooLarge(
                f"a range of {tried} block(s) is refused and the minimum is {self._minimum}"
            )
        self._size = max(self._minimum, tried // 2)
        self._ceiling = self._size
        self._streak = 0


async def fetch_logs(
    client: RpcClient,
    sizer: LogRangeSizer,
    *,
    from_block: int,
    to_block: int,
    addresses: Sequence[str],
    topics: TopicFilter | None = None,
) -> list[RawLog]:
    """Return every log of the inclusive range sorted by (block, log index), or raise.

    Never a partial list: a chunk the node refuses is shrunk and asked again until it is
    answered or cannot shrink. Safe to cancel; nothing is kept between calls but the sizer.
    """
    if from_block > to_block:
        raise ValueError(f"bad block range {from_block}..{to_block}")
    logs: list[RawLog] = []
    start = from_block
    while start <= to_block:
        end = min(to_block, start + sizer.size - 1)
        span = end - start + 1
        try:
            chunk = await client.get_logs(
                start,
                end,
                addresses=addresses,
                topics=topics,
                shrinkable=span > sizer.minimum,
            )
        except RpcRangeTooLarge:
            sizer.on_too_large(span)  # raises once the chunk cannot shrink any more
            continue
        sizer.on_success()
        # Chunks are disjoint and ascending, and each comes sorted, so the list stays sorted.
        logs += chunk
        start = end + 1
    return logs
