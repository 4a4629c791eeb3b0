"""Decode raw logs into JSON-safe arguments, by (contract kind, topic0).

Output conventions (the wire format in docs/protocol.md): integers are decimal strings so
uint256 stays exact in JavaScript, addresses are lowercase, bytes are 0x hex, every uint8 is an
enum and gets a sibling `<name>Name` with the value's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from indexer.catalog import MARKET_ARGUMENTS, ContractKind, EventSpec, Param, catalog

JsonValue = str | bool | None


class UndecodableLog(ValueError):  # noqa: N818 - named for what happened, like errors.py
    """A log whose topic0 is known but whose layout does not match the declaration."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded event: its spec, arguments, and the market it concerns (if any)."""

    spec: EventSpec
    args: dict[str, JsonValue]
    market: str | None


def _json_value(param: Param, value: Any) -> JsonValue:
    if param.type == "address":
        return str(value).lower()
    if param.type == "bool":
        return bool(value)
    if param.type.startswith(("uint", "int")):
        return str(int(value))
    if param.type.startswith("bytes"):
        return "0x" + bytes(value).hex()
    if param.type == "string":
        return str(value)
    raise UndecodableLog(f"unsupported parameter type {param.type}")


def _topic_value(param: Param, topic: str) -> Any:
    raw = bytes.fromhex(topic[2:])
    if len(raw) != 32:
        raise UndecodableLog(f"topic for {param.name} is not 32 bytes")
    if param.type == "address":
        if any(raw[:12]):
            raise UndecodableLog(f"topic for {param.name} is not an address")
        return "0x" + raw[12:].hex()
    if param.type == "bool":
        return int.from_bytes(raw, "big") != 0
    if param.type.startswith("uint"):
        return int.from_bytes(raw, "big")
    if param.type == "bytes32":
        return raw
    raise UndecodableLog(f"unsupported indexed type {param.type}")


def _uint_bits(abi_type: str) -> int:
    return int(abi_type[4:] or 256)


def decode_data(types: Sequence[str], data: bytes) -> list[Any]:
    """ABI-decode the non-indexed values of a log, for the types KEKTECH events use.

    A direct reading of the 32-byte words instead of eth_abi's generic decoder, which cost
    more than everything else the indexer does per event (measured). Exactly as strict:
    the tests check it against eth_abi on valid encodings and on arbitrary bytes.
    """
    head = 32 * len(types)
    if len(data) < head:
        raise UndecodableLog(f"data is {len(data)} bytes, the head alone needs {head}")
    values: list[Any] = []
    for index, abi_type in enumerate(types):
        word = data[32 * index : 32 * index + 32]
        if abi_type == "string":
            values.append(_read_string(data, int.from_bytes(word, "big")))
            continue
        value = int.from_bytes(word, "big")
        if abi_type == "address":
            if value >> 160:
                raise UndecodableLog("address with non-zero padding")
            values.append("0x" + word[12:].hex())
        elif abi_type == "bool":
            if value > 1:
                raise UndecodableLog("bool that is neither 0 nor 1")
            values.append(value == 1)
        elif abi_type == "bytes32":
            values.append(word)
        elif abi_type.startswith("uint"):
            if value >> _uint_bits(abi_type):
                raise UndecodableLog(f"{abi_type} out of range")
            values.append(value)
        else:
            raise UndecodableLog(f"unsupported parameter type {abi_type}")
    return values


def _read_string(data: bytes, offset: int) -> str:
    if offset + 32 > len(data):
        raise UndecodableLog("string offset out of range")
    length = int.from_bytes(data[offset : offset + 32], "big")
    start = offset + 32
    end = start + length
    padded = start + -(-length // 32) * 32
    if padded > len(data):
        raise UndecodableLog("string runs past the data")
    if any(data[end:padded]):
        raise UndecodableLog("string with non-zero padding")
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UndecodableLog("string is not UTF-8") from exc


def decode_args(spec: EventSpec, topics: Sequence[str], data: str) -> dict[str, JsonValue]:
    """Decode one log's topics and data according to `spec` (in declaration order)."""
    indexed, plain = spec.indexed, spec.non_indexed
    if len(topics) != len(indexed) + 1:
        raise UndecodableLog(
            f"{spec.name} expects {len(indexed)} indexed topics, log has {len(topics) - 1}"
        )
    try:
        payload = bytes.fromhex(data[2:])
    except ValueError as exc:
        raise UndecodableLog(f"{spec.name} data is not hex") from exc
    values = decode_data(spec.data_types, payload)
    raw: dict[str, Any] = {
        p.name: _topic_value(p, t) for p, t in zip(indexed, topics[1:], strict=True)
    }
    raw.update(zip((p.name for p in plain), values, strict=True))
    args: dict[str, JsonValue] = {}
    for param in spec.params:
        value = raw[param.name]
        args[param.name] = _json_value(param, value)
        names = param.enum_names
        if names is not None:
            index = int(value)
            args[f"{param.name}Name"] = names[index] if index < len(names) else "UNKNOWN"
    return args


def decode_log(
    kind: ContractKind, address: str, topics: Sequence[str], data: str
) -> Decoded | None:
    """Decode a log from a tracked contract; None when its topic0 is not in the catalogue.

    Raises UndecodableLog when the topic0 is known but the layout is not (a contract at a
    tracked address that declares the event differently).
    """
    if not topics:
        return None
    spec = catalog().get((kind, topics[0].lower()))
    if spec is None:
        return None
    args = decode_args(spec, topics, data)
    if kind is ContractKind.MARKET:
        market: str | None = address
    else:
        market = next((str(args[n]) for n in MARKET_ARGUMENTS if n in args), None)
    return Decoded(spec=spec, args=args, market=market)
