"""The event envelope: one decoded contract log as the indexer publishes it and browsers get it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails
from typing_extensions import TypeAliasType

from shared.errors import EnvelopeError
from shared.evm import ADDRESS_PATTERN, HASH_PATTERN

__all__ = [
    "ArgValue",
    "ContractKind",
    "EventEnvelope",
    "WireEnvelope",
    "concerned_market",
    "event_id",
    "normalize_timestamp",
]

ContractKind = Literal["factory", "market", "resolution_manager", "reward_distributor"]

# No numbers: uint256 values do not fit a JavaScript number, so the indexer sends decimal strings.
# Sequence and Mapping (covariant) let callers pass e.g. dict[str, str]; parsing yields list/dict.
# (typing_extensions ships with pydantic; typing.TypeAliasType needs Python 3.12.)
ArgValue = TypeAliasType(
    "ArgValue", "str | bool | Sequence[ArgValue] | Mapping[str, ArgValue] | None"
)

EVENT_NAME_PATTERN = r"^[A-Z][A-Za-z0-9]{0,63}$"
# The arguments naming the market an event of a factory, the resolution manager or the reward
# distributor concerns (a market's own events concern the market that emits them).
MARKET_ARGUMENTS = ("marketAddress", "market")
_CANONICAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

Address = Annotated[str, Field(pattern=ADDRESS_PATTERN)]
Hash = Annotated[str, Field(pattern=HASH_PATTERN)]


def event_id(chain_id: int, tx_hash: str, log_index: int) -> str:
    """Return the stable id of a log: "{chainId}:{transactionHash}:{logIndex}"."""
    return f"{chain_id}:{tx_hash.lower()}:{log_index}"


def concerned_market(contract_kind: str, contract: str, args: Mapping[str, ArgValue]) -> str | None:
    """The market an event concerns (its marketAddress): the emitter for a market's events,
    else the first of MARKET_ARGUMENTS it has, else None (a contract-wide event)."""
    if contract_kind == "market":
        return contract
    return next((str(args[name]) for name in MARKET_ARGUMENTS if name in args), None)


class EventEnvelope(BaseModel):
    """One contract event as sent to Redis and on to browsers; camelCase on the wire.

    `eventType` always equals `type` and `id` always equals event_id(chainId, transactionHash,
    logIndex): both are filled in when omitted and a mismatch is rejected. `data` defaults to
    `args` and must equal it; the deployed frontend reads `data` (e.g. `data.question` of
    MarketCreated). `args` with `transactionHash` added is accepted too, and relayed as it
    is: the frontend may de-duplicate on `data.transactionHash` (docs/broadcaster.md), and an
    indexer can only start writing it once every broadcaster it feeds accepts it.
    `marketAddress` must be concerned_market()'s: the channels follow it.

    Measured on a shared 2-vCPU VM (Python 3.11, pydantic 2.14, 11 args): from_json_bytes about
    15 µs (the recursive ArgValue check is ~5 µs of that), to_json_bytes 6-9 µs; some 60k
    parses per second per core, so the envelope is not the broadcaster's bottleneck.
    """

    model_config = ConfigDict(
        frozen=True,
        # Strict: a number where a string belongs (e.g. an arg) is a producer bug, not coercible.
        strict=True,
        # Ignore, not forbid: during a deploy an older broadcaster may read a newer indexer's
        # envelopes and must keep relaying them.
        extra="ignore",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    type: str = Field(pattern=EVENT_NAME_PATTERN)
    # Defaults only so type checkers let callers omit them; _fill_derived_fields sets them.
    event_type: str = ""
    id: str = ""
    seq: int | None = Field(default=None, ge=1)
    chain_id: int = Field(gt=0)
    contract: Address
    contract_kind: ContractKind
    market_address: Address | None = None
    block_number: int = Field(ge=0)
    block_hash: Hash
    transaction_hash: Hash
    log_index: int = Field(ge=0)
    timestamp: str
    args: Mapping[str, ArgValue]
    data: Mapping[str, ArgValue] = Field(default_factory=dict)
    removed: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_derived_fields(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values  # pydantic reports the type error
        missing: dict[str, Any] = {}
        if "eventType" not in values and "event_type" not in values and "type" in values:
            missing["eventType"] = values["type"]
        if "id" not in values:
            parts = [
                _get_either(values, "chainId", "chain_id"),
                _get_either(values, "transactionHash", "transaction_hash"),
                _get_either(values, "logIndex", "log_index"),
            ]
            if None not in parts:
                missing["id"] = ":".join(str(part) for part in parts)
        if "data" not in values and "args" in values:
            missing["data"] = values["args"]
        return values | missing if missing else values

    @model_validator(mode="after")
    def _check_derived_fields(self) -> Self:
        if self.event_type != self.type:
            raise ValueError("eventType must equal type")
        if self.id != event_id(self.chain_id, self.transaction_hash, self.log_index):
            raise ValueError("id must be {chainId}:{transactionHash}:{logIndex}")
        if self.data != self.args and self.data != {
            **self.args,
            "transactionHash": self.transaction_hash,
        }:
            raise ValueError("data must equal args (transactionHash may be added)")
        if self.market_address != concerned_market(self.contract_kind, self.contract, self.args):
            raise ValueError(
                "marketAddress must be the emitter for a market's events, else its"
                " marketAddress or market argument, else null"
            )
        return self

    @field_validator("timestamp", mode="before")
    @classmethod
    def _normalize_timestamp(cls, value: object) -> str:
        return normalize_timestamp(value)

    def to_json_bytes(self) -> bytes:
        """Serialize to compact JSON with camelCase keys."""
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_json_bytes(cls, raw: bytes | bytearray | str) -> Self:
        """Parse and validate JSON, raising EnvelopeError on anything that is not an envelope."""
        if _maybe_not_json(raw):
            try:
                orjson.loads(raw)  # strict JSON: no NaN or Infinity, which browsers refuse
            except orjson.JSONDecodeError as exc:
                raise EnvelopeError(f"invalid event envelope: not JSON: {exc}") from None
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise EnvelopeError(_describe(exc.errors(include_url=False))) from None

    def as_removed(self) -> Self:
        """Return a copy marked removed, for a log that a reorg took off the chain."""
        return self.model_copy(update={"removed": True})


class WireEnvelope(EventEnvelope):
    """An envelope exactly as browsers get it (docs/protocol.md): camelCase keys only, every
    field present (`eventType`, `id`, `data` included), the timestamp already in its one form.

    The broadcaster relays a producer's bytes as they are, so it accepts only this form:
    what EventEnvelope would fill in or normalize would reach the frontend unfilled.
    """

    model_config = ConfigDict(validate_by_name=False)

    event_type: str
    id: str
    seq: int = Field(ge=1)
    market_address: Address | None  # present, null for contract-wide events
    data: Mapping[str, ArgValue]
    removed: bool

    @model_validator(mode="before")
    @classmethod
    def _fill_derived_fields(cls, values: Any) -> Any:
        return values  # nothing is filled in: a field left out is an error

    @field_validator("timestamp", mode="before")
    @classmethod
    def _normalize_timestamp(cls, value: object) -> str:
        if isinstance(value, str) and _CANONICAL_TIME.fullmatch(value):
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"timestamp is not a date: {value}") from None
            return value
        raise ValueError('timestamp must be "YYYY-MM-DDTHH:MM:SSZ" (UTC)')


def normalize_timestamp(value: object) -> str:
    """Return a block time as "YYYY-MM-DDTHH:MM:SSZ" given an ISO string, datetime or Unix time."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("timestamp is not an ISO 8601 date-time") from None
        if _CANONICAL_TIME.fullmatch(value):
            return value  # fast path: what the indexer sends
        value = parsed
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("timestamp needs a time zone")
        if value.microsecond:
            raise ValueError("block timestamps are whole seconds")
        return value.astimezone(UTC).strftime(_TIME_FORMAT)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).strftime(_TIME_FORMAT)
        except (OverflowError, OSError, ValueError):
            raise ValueError("timestamp is out of range") from None
    raise ValueError("timestamp must be an ISO 8601 string, a datetime or Unix seconds")


def _maybe_not_json(raw: bytes | bytearray | str) -> bool:
    """Whether raw may hold NaN or Infinity, which pydantic's parser takes as numbers but
    JSON (and so JSON.parse in browsers) does not have. A plain substring test: the strict
    parse that settles it runs only then."""
    if isinstance(raw, str):
        return "NaN" in raw or "Infinity" in raw
    return b"NaN" in raw or b"Infinity" in raw


def _get_either(values: dict[str, Any], alias: str, name: str) -> Any:
    """Return the value given under its wire alias or its Python name."""
    return values[alias] if alias in values else values.get(name)


def _describe(errors: list[ErrorDetails]) -> str:
    """Summarize validation errors without quoting the input (it may be large or hostile)."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "envelope"
    reason = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid event envelope: {where}: {reason}{more}"
