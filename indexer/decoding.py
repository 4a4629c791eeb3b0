"""Decode raw logs into JSON-safe arguments, by (contract kind, topic0).

Output conventions (the wire format in docs/protocol.md): integers are decimal strings so
uint256 stays exact in JavaScript, addresses are lowercase, bytes are 0x hex, every uint8 is an
enum and gets a sibling `<name>Name` with the value's name. Strings are UTF-8 with what text
cannot carry replaced by U+FFFD: invalid bytes (Solidity does not check them) and U+0000
(Postgres text and jsonb refuse it); the log's exact bytes stay in its raw data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from indexer.catalog import MARKET_CREATED, ContractKind, EventSpec, catalog
from shared.envelope import concerned_market

JsonValue = str | bool | None

REPLACEMENT = "\ufffd"  # stands for what a decoded string cannot carry


class UndecodableLog(ValueError):  # noqa: N818 - named for what happened, like errors.py
    """A log whose topic0 is known but whose layout does not match the declaration."""


# Not frozen: a frozen dataclass sets each field through object.__setattr__, for every event.
# Nothing hashes or changes a Decoded (its args are a dict: it never was hashable).
@dataclass(slots=True)
class Decoded:
    """A decoded event: its spec, arguments, and the market it concerns (if any)."""

    spec: EventSpec
    args: dict[str, JsonValue]
    market: str | None


Reader = Callable[[bytes, int], Any]  # (data, offset of the value's head word) -> value


def _read_uint256(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 32], "big")  # 32 bytes are always in range


def _read_uint(bits: int) -> Reader:
    if bits == 256:
        return _read_uint256
    limit = 1 << bits

    def read(data: bytes, at: int) -> int:
        value = int.from_bytes(data[at : at + 32], "big")
        if value >= limit:
            raise UndecodableLog(f"uint{bits} out of range")
        return value

    return read


def _read_address(data: bytes, at: int) -> str:
    if any(data[at : at + 12]):
        raise UndecodableLog("address with non-zero padding")
    return "0x" + data[at + 12 : at + 32].hex()


def _read_bool(data: bytes, at: int) -> bool:
    value = int.from_bytes(data[at : at + 32], "big")
    if value > 1:
        raise UndecodableLog("bool that is neither 0 nor 1")
    return value == 1


def _read_bytes32(data: bytes, at: int) -> bytes:
    return data[at : at + 32]


def _read_string(data: bytes, at: int) -> str:
    offset = int.from_bytes(data[at : at + 32], "big")
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
    # Anyone can put any bytes in a string argument (a market's question): refusing them
    # would leave the event undecoded and its market unknown, and a NUL would stop the
    # indexer at its commit, so both become U+FFFD.
    return data[start:end].decode("utf-8", errors="replace").replace("\x00", REPLACEMENT)


def _unsupported(abi_type: str) -> Reader:
    def read(data: bytes, at: int) -> Any:
        raise UndecodableLog(f"unsupported parameter type {abi_type}")

    return read


@functools.cache
def _reader(abi_type: str) -> Reader:
    """How to read one value of `abi_type` from its head word (decided once per type)."""
    if abi_type == "address":
        return _read_address
    if abi_type == "bool":
        return _read_bool
    if abi_type == "bytes32":
        return _read_bytes32
    if abi_type == "string":
        return _read_string
    if abi_type.startswith("uint") and (abi_type[4:] or "256").isdigit():
        return _read_uint(int(abi_type[4:] or 256))
    return _unsupported(abi_type)


def decode_data(types: Sequence[str], data: bytes) -> list[Any]:
    """ABI-decode the non-indexed values of a log, for the types KEKTECH events use.

    A direct reading of the 32-byte words instead of eth_abi's generic decoder, which cost
    more than everything else the indexer does per event (measured). Exactly as strict:
    the tests check it against eth_abi on valid encodings and on arbitrary bytes.
    """
    return _read_data(tuple(_reader(abi_type) for abi_type in types), data)


def _read_data(readers: Sequence[Reader], data: bytes) -> list[Any]:
    head = 32 * len(readers)
    if len(data) < head:
        raise UndecodableLog(f"data is {len(data)} bytes, the head alone needs {head}")
    return [read(data, 32 * index) for index, read in enumerate(readers)]


def _json(abi_type: str) -> Callable[[Any], JsonValue]:
    """How a decoded value of `abi_type` is written in the envelope."""
    if abi_type.startswith(("uint", "int")):
        return str
    if abi_type.startswith("bytes"):
        return _hex
    return _same  # address (already lowercase), bool, string


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _same(value: JsonValue) -> JsonValue:
    return value


@dataclass(frozen=True, slots=True)
class _Field:
    """One argument: where it is (topic position, or position among the data values), how it
    is read and how it is written."""

    name: str
    topic: int | None
    data_index: int
    read: Reader
    to_json: Callable[[Any], JsonValue]
    enum_names: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to decode one event, worked out once per spec instead of once per log."""

    topics: int
    data_readers: tuple[Reader, ...]
    fields: tuple[_Field, ...]


# By EventSpec.key: a plain string, so a lookup per log costs one cached hash.
_plans: dict[str, _Plan] = {}


def _plan(spec: EventSpec) -> _Plan:
    plan = _plans.get(spec.key)
    if plan is None:
        plan = _plans[spec.key] = _compile(spec)
    return plan


def _compile(spec: EventSpec) -> _Plan:
    fields = []
    topic = data = 0
    for param in spec.params:
        if param.indexed:
            topic += 1
            # Only single-word values are readable from a topic (a string is only a hash).
            simple = param.type in ("address", "bool", "bytes32") or param.type.startswith("uint")
            read = _reader(param.type) if simple else _unsupported(f"indexed {param.type}")
        else:
            read = _reader(param.type)
        fields.append(
            _Field(
                name=param.name,
                topic=topic if param.indexed else None,
                data_index=-1 if param.indexed else data,
                read=read,
                to_json=_json(param.type),
                enum_names=param.enum_names,
            )
        )
        data += not param.indexed
    data_readers = tuple(f.read for f in fields if f.topic is None)
    return _Plan(topics=topic + 1, data_readers=data_readers, fields=tuple(fields))


def decode_args(spec: EventSpec, topics: Sequence[str], data: str) -> dict[str, JsonValue]:
    """Decode one log's topics and data according to `spec` (in declaration order)."""
    plan = _plan(spec)
    if len(topics) != plan.topics:
        raise UndecodableLog(
            f"{spec.name} expects {plan.topics - 1} indexed topics, log has {len(topics) - 1}"
        )
    try:
        payload = bytes.fromhex(data[2:])
    except ValueError as exc:
        raise UndecodableLog(f"{spec.name} data is not hex") from exc
    values = _read_data(plan.data_readers, payload)
    args: dict[str, JsonValue] = {}
    for field in plan.fields:
        if field.topic is None:
            value = values[field.data_index]
        else:
            raw = bytes.fromhex(topics[field.topic][2:])
            if len(raw) != 32:
                raise UndecodableLog(f"topic for {field.name} is not 32 bytes")
            value = field.read(raw, 0)
        args[field.name] = field.to_json(value)
        names = field.enum_names
        if names is not None:
            args[field.name + "Name"] = names[value] if value < len(names) else "UNKNOWN"
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
    # Positional: keywords cost more, for every event.
    return Decoded(spec, args, concerned_market(kind, address, args))


def announced_market(topics: Sequence[str], data: str) -> str | None:
    """The market clone a factory's log announces: the `marketAddress` of a MarketCreated
    that decodes; None for any other log. One that does not decode is stored raw and makes no
    `markets` row, which is where a restart finds the markets to follow: it announces nothing,
    or its "market" would be followed until the next restart only."""
    if not topics or topics[0] != MARKET_CREATED.topic0:
        return None
    try:
        args = decode_args(MARKET_CREATED, topics, data)
    except UndecodableLog:
        return None
    return str(args["marketAddress"])
