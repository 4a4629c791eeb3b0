"""Text forms of EVM values (addresses, 32-byte hashes) as this project stores and sends them."""

from __future__ import annotations

import re

from eth_hash.auto import keccak

__all__ = [
    "ADDRESS_PATTERN",
    "HASH_PATTERN",
    "checked_address",
    "is_address",
    "normalize_address",
]

# Lowercase is the canonical form everywhere (database, envelopes, channel names); the EIP-55
# checksum is checked only where a person wrote the address (settings).
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


def checked_address(text: str) -> str:
    """Return the lowercase form of an address a person wrote, or raise ValueError if text is
    not one or, written in mixed case, its EIP-55 checksum does not match."""
    lower = normalize_address(text)
    digits = text[2:]
    # All one case carries no checksum (EIP-55); any mix of cases does.
    if digits not in (digits.lower(), digits.upper()) and digits != _checksummed(lower[2:]):
        raise ValueError(
            "the EIP-55 checksum (the case of the letters) does not match: check the address "
            "for a typo; one written all in lowercase skips the check"
        )
    return lower


def _checksummed(digits: str) -> str:
    """The 40 lowercase hex digits of an address in EIP-55 case: a letter is upper case where
    the keccak-256 of the digits has a nibble of 8 or more."""
    nibbles = keccak(digits.encode("ascii")).hex()
    return "".join(
        c.upper() if int(n, 16) >= 8 else c for c, n in zip(digits, nibbles, strict=False)
    )
