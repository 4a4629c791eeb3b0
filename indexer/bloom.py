"""Ethereum log blooms: whether a block's header allows a log of an address or a topic.

A header's `logsBloom` is 2048 bits, set by the keccak-256 of each log's address and topics
(three bits each, Yellow Paper 4.3.1). An item whose bits are not all set is in no log of the
block; one whose bits are all set may be (blooms have false positives). Pure functions, no I/O.
"""

from __future__ import annotations

import functools

from eth_hash.auto import keccak

BLOOM_BYTES = 256
# Lotus answers every block with every bit set (it computes no bloom): that says nothing.
FULL_BLOOM = b"\xff" * BLOOM_BYTES
# Items whose bits are remembered: the tracked addresses (thousands of markets) and topic0s.
ITEMS_CACHED = 1 << 16


@functools.lru_cache(maxsize=ITEMS_CACHED)
def bloom_mask(item: str) -> int:
    """The bits an address or a 32-byte value (hex, "0x" first) sets, as an int whose bit n
    is bit n of the bloom read as one big-endian number."""
    # Cached: every doubtful tip block checks each tracked address, a keccak each otherwise.
    digest = keccak(bytes.fromhex(item[2:]))
    mask = 0
    for i in (0, 2, 4):
        mask |= 1 << (((digest[i] << 8) | digest[i + 1]) & 2047)
    return mask


def bloom_number(bloom: bytes) -> int:
    """A bloom as one number, for `may_contain`: a block's items are checked against it."""
    return int.from_bytes(bloom, "big")


def may_contain(bloom: int, item: str) -> bool:
    """Whether the bloom (`bloom_number`) allows a log with this address or topic: False is
    certain, True may be a false positive."""
    mask = bloom_mask(item.lower())
    return bloom & mask == mask
