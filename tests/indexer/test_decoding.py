"""The event catalogue and decoder: exact signatures, exact values, defensive on bad logs."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from eth_abi.abi import decode as eth_abi_decode
from eth_abi.abi import encode
from eth_utils.crypto import keccak
from hypothesis import given
from hypothesis import strategies as st

from indexer.batch import StoredEvent, block_time
from indexer.catalog import MARKET_CREATED, ContractKind, EventSpec, catalog, parse_declaration
from indexer.decoding import Decoded, UndecodableLog, decode_data, decode_log
from indexer.rpc_results import RawLog
from shared.channels import channels_for
from tests.reference_events import REFERENCE_EVENTS, canonical

MARKET = "0x31d2bc49a6fd4a066f5f8ac61acd0e6c9105dd84"
BETTOR = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"
BET_PLACED = "BetPlaced(address,uint8,uint256,uint256,uint256)"


def topic(value: int | str) -> str:
    if isinstance(value, str):
        return "0x" + value[2:].rjust(64, "0")
    return "0x" + value.to_bytes(32, "big").hex()


def test_catalogue_is_exactly_the_reference() -> None:
    """Every reference declaration is in the catalogue under its contract kind, and nothing else."""
    expected = {
        (ContractKind(kind), "0x" + keccak(text=canonical(d)).hex()): canonical(d)
        for kind, declarations in REFERENCE_EVENTS.items()
        for d in declarations
    }
    assert {key: spec.signature for key, spec in catalog().items()} == expected


def test_catalogue_keeps_the_references_names_and_indexed_flags() -> None:
    """Beyond topic0: each parameter's name (the frontend reads `args` by it) and whether it
    is indexed (where its value is read from), as the reference declares them, word for word."""
    expected = sorted(
        f"{kind}:{d}" for kind, declarations in REFERENCE_EVENTS.items() for d in declarations
    )
    assert sorted(spec.key for spec in catalog().values()) == expected


def test_same_name_different_contracts_decode_differently() -> None:
    """MarketResolved of a market and of the resolution manager have distinct layouts."""
    by_kind = {key[0]: spec for key, spec in catalog().items() if spec.name == "MarketResolved"}
    assert by_kind[ContractKind.MARKET].signature == "MarketResolved(uint8,address,uint256)"
    assert by_kind[ContractKind.RESOLUTION_MANAGER].signature == (
        "MarketResolved(address,uint8,address,uint256)"
    )


def test_bet_placed_decodes_exact_uint256_and_enum_names() -> None:
    """Amounts beyond 2**64 stay exact as decimal strings; outcomes get their enum name."""
    amount = 2**200 + 12345
    data = "0x" + encode(["uint256", "uint256", "uint256"], [amount, 7, 1762387200]).hex()
    topics = ["0x" + keccak(text=BET_PLACED).hex(), topic(BETTOR), topic(2)]
    decoded = decode_log(ContractKind.MARKET, MARKET, topics, data)
    assert decoded is not None
    assert decoded.market == MARKET
    assert decoded.args == {
        "bettor": BETTOR,
        "outcome": "2",
        "outcomeName": "OUTCOME2",
        "amount": str(amount),
        "shares": "7",
        "timestamp": "1762387200",
    }


def test_market_created_keeps_question_and_category() -> None:
    """The factory's announcement decodes its string, bytes32 and the new market's address."""
    category = keccak(text="crypto")
    data = (
        "0x"
        + encode(["string", "uint256", "uint256", "uint256"], ["Will it rain? ☔", 10, 5, 99]).hex()
    )
    topics = [MARKET_CREATED.topic0, topic(MARKET), topic(BETTOR), "0x" + category.hex()]
    decoded = decode_log(ContractKind.FACTORY, "0x" + "11" * 20, topics, data)
    assert decoded is not None
    assert decoded.market == MARKET
    assert decoded.args["question"] == "Will it rain? ☔"
    assert decoded.args["category"] == "0x" + category.hex()


def test_unknown_topic_is_none_not_an_error() -> None:
    """A topic0 the contract kind does not declare is reported as unknown."""
    topics = ["0x" + keccak(text=BET_PLACED).hex(), topic(BETTOR), topic(1)]
    assert decode_log(ContractKind.FACTORY, MARKET, topics, "0x") is None
    assert decode_log(ContractKind.MARKET, MARKET, [], "0x") is None


def test_wrong_layout_is_undecodable() -> None:
    """A known topic0 with the wrong number of topics or short data raises UndecodableLog."""
    good = "0x" + encode(["uint256", "uint256", "uint256"], [1, 1, 1]).hex()
    bet = "0x" + keccak(text=BET_PLACED).hex()
    with pytest.raises(UndecodableLog):
        decode_log(ContractKind.MARKET, MARKET, [bet, topic(BETTOR)], good)
    with pytest.raises(UndecodableLog):
        decode_log(ContractKind.MARKET, MARKET, [bet, topic(BETTOR), topic(1)], good[:-64])


def test_out_of_range_enum_is_named_unknown() -> None:
    """An enum value past the known names decodes as UNKNOWN instead of failing."""
    state_changed = "0x" + keccak(text="MarketStateChanged(uint8,uint256)").hex()
    data = "0x" + encode(["uint256"], [1]).hex()
    decoded = decode_log(ContractKind.MARKET, MARKET, [state_changed, topic(9)], data)
    assert decoded is not None
    assert decoded.args["newStateName"] == "UNKNOWN"


def test_malformed_declarations_are_rejected() -> None:
    """The declaration parser refuses text it cannot read."""
    for bad in ("NoParens", "Bad(uint256 indexed)", "Bad(uint256 a b c)", "1x(uint256 a)"):
        with pytest.raises(ValueError, match="malformed"):
            parse_declaration(ContractKind.MARKET, bad)


@given(data=st.binary(max_size=300), count=st.integers(min_value=0, max_value=4))
def test_arbitrary_logs_never_crash_the_decoder(data: bytes, count: int) -> None:
    """Any data and topic count for a known event either decodes or raises UndecodableLog."""
    bet = "0x" + keccak(text=BET_PLACED).hex()
    topics = [bet] + [topic(i) for i in range(count)]
    with contextlib.suppress(UndecodableLog):
        decode_log(ContractKind.MARKET, MARKET, topics, "0x" + data.hex())


def test_strings_that_text_cannot_carry_get_replacement_characters() -> None:
    """Invalid UTF-8 (Solidity does not check it) and U+0000 (Postgres text refuses it)
    become U+FFFD; the rest of the string is kept."""
    data = encode(["bytes", "uint256"], [b"ok \xff\xfe and \x00 \xe2\x98\x94", 7])
    assert decode_data(("string", "uint256"), data) == ["ok \ufffd\ufffd and \ufffd \u2614", 7]


LAYOUTS = sorted({tuple(p.type for p in spec.non_indexed) for spec in catalog().values()})
VALUES = {
    "address": st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex()),
    "bool": st.booleans(),
    "bytes32": st.binary(min_size=32, max_size=32),
    "string": st.text(max_size=80),
    "uint8": st.integers(min_value=0, max_value=2**8 - 1),
    "uint64": st.integers(min_value=0, max_value=2**64 - 1),
    "uint256": st.integers(min_value=0, max_value=2**256 - 1),
}


def reference(types: tuple[str, ...], data: bytes) -> list[object] | None:
    """eth_abi's reading of the data, normalized like ours; None when eth_abi refuses it.

    Strings are read as the bytes they are encoded as (the same layout and checks), then
    decoded as ours decodes them: U+FFFD for invalid UTF-8 and for U+0000.
    """
    try:
        values = eth_abi_decode(["bytes" if t == "string" else t for t in types], data)
    except Exception:  # any refusal counts; which one does not matter here
        return None
    return [_normalized(t, v) for t, v in zip(types, values, strict=True)]


def _normalized(abi_type: str, value: Any) -> object:
    if abi_type == "address":
        return value.lower()
    if abi_type == "string":
        return value.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return value


@given(data=st.data())
def test_fast_decoder_equals_eth_abi_on_valid_encodings(data: st.DataObject) -> None:
    """For every event layout, encoded values decode to exactly what eth_abi decodes."""
    types = data.draw(st.sampled_from(LAYOUTS))
    values = [data.draw(VALUES[t]) for t in types]
    encoded = encode(list(types), values)
    assert decode_data(types, encoded) == reference(types, encoded)


@given(data=st.data())
def test_fast_decoder_is_as_strict_as_eth_abi_on_arbitrary_bytes(data: st.DataObject) -> None:
    """On arbitrary (often mutated) bytes, ours and eth_abi accept and refuse the same input."""
    types = data.draw(st.sampled_from(LAYOUTS))
    valid = encode(list(types), [data.draw(VALUES[t]) for t in types])
    mutated = data.draw(
        st.one_of(
            st.binary(max_size=400),
            st.builds(
                lambda i, b: valid[:i] + bytes([b]) + valid[i + 1 :],
                st.integers(min_value=0, max_value=max(0, len(valid) - 1)),
                st.integers(min_value=0, max_value=255),
            ),
            st.integers(min_value=0, max_value=len(valid)).map(lambda n: valid[:n]),
        )
    )
    expected = reference(types, mutated)
    try:
        ours: list[object] | None = decode_data(types, mutated)
    except UndecodableLog:
        ours = None
    assert ours == expected


SPECS = sorted(catalog().values(), key=lambda spec: (spec.kind, spec.name))


def expected_json(param_type: str, value: object) -> str | bool:
    """A value as docs/protocol.md writes it: decimal strings, lowercase hex, and in strings
    U+FFFD for U+0000 (Postgres text cannot hold it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    assert isinstance(value, str)
    return value.lower() if param_type == "address" else value.replace("\x00", "\ufffd")


@given(data=st.data())
def test_every_event_decodes_to_its_json_arguments(data: st.DataObject) -> None:
    """Any valid log of any catalogued event gives each argument, in order, plus enum names."""
    spec = data.draw(st.sampled_from(SPECS))
    values = {p.name: data.draw(VALUES[p.type]) for p in spec.params}
    topics = [spec.topic0] + ["0x" + encode([p.type], [values[p.name]]).hex() for p in spec.indexed]
    payload = encode(list(spec.data_types), [values[p.name] for p in spec.non_indexed])
    decoded = decode_log(spec.kind, MARKET, topics, "0x" + payload.hex())
    assert decoded is not None
    expected: dict[str, str | bool] = {}
    for param in spec.params:
        expected[param.name] = expected_json(param.type, values[param.name])
        if param.enum_names is not None:
            index = values[param.name]
            assert isinstance(index, int)
            names = param.enum_names
            expected[f"{param.name}Name"] = names[index] if index < len(names) else "UNKNOWN"
    assert decoded.args == expected
    assert list(decoded.args) == list(expected)


@given(
    spec=st.sampled_from(SPECS),
    market=st.none() | st.from_regex(r"0x[0-9a-fA-F]{40}", fullmatch=True),
)
def test_an_events_channels_in_the_outbox_are_those_of_channels_for(
    spec: EventSpec, market: str | None
) -> None:
    """What the outbox stores as an event's channels is shared.channels' answer, space-separated,
    for any catalogued event, with a market (in any letter case) or none."""
    log = RawLog(MARKET, (spec.topic0,), "0x", 1, "0x" + "11" * 32, "0x" + "22" * 32, 0, 0, False)
    decoded = Decoded(spec, {}, market)
    event = StoredEvent(log=log, kind=spec.kind, decoded=decoded, block_time=block_time(0))
    assert event.channel_list == " ".join(channels_for(spec.name, spec.kind.value, market))
