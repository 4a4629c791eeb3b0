"""Text forms of EVM values (addresses, 32-byte hashes) as this project stores and sends them."""

from __future__ import annotations

import re

__all__ = [
    "ADDRESS_PATTERN",
    "HASH_PATTERN",
    "is_address",
    "normalize_address",
]

# Lowercase is the canonical form everywhere (database, envelopes, channel names); checksum
# validation would need keccak, and only the indexer's web3 module may import that.
ADDRESS_PATTERN = r"^0x[0-9a-f]{40}$"
HASH_PATTERN = r"^0x[0-9a-f]{64}$"

_ANY_CASE_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def is_address(text: str) -> bool:
    """Return whether text is 0x followed by 40 hex digits, in any letter case."""
    return _ANY_CASE_ADDRESS.fullmatch(text) is not None


def normalize_address(text: str) -> str:
    """Return the lowercase form of an address, or raise ValueError if text is not one."""
    if not is_address(text):
        raise ValueError("expected 0x followed by 40 hex digits")
    return text.lower()
