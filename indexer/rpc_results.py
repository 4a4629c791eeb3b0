"""Block headers and logs as the indexer uses them, checked on their way in from the node.

Pure functions, no I/O. A node's answer crosses a process boundary, so nothing is trusted:
a field of the wrong shape, a log outside the asked range, from an address or with a topic
that was not asked for, or two different logs at one position is an `RpcResponseError`, never
a silent gap. The same log twice in an answer (some providers repeat logs) is taken once.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from indexer.bloom import BLOOM_BYTES, FULL_BLOOM
from indexer.errors import BlockNotFound, ReorgDuringFetch, RpcResponseError
from indexer.rpc_wire import GET_LOGS, TransientFailure, parse_quantity
from shared.evm import normalize_address

__all__ = [
    "BlockHeader",
    "LogQuery",
    "RawLog",
    "TopicFilter",
    "check_has_block",
    "parse_header",
    "parse_logs",
]

log = structlog.get_logger()

GET_BLOCK = "eth_getBlockByNumber"
MAX_TOPICS = 4
# Address lists remembered by LogQuery.build: the follower's chunks of tracked contracts.
ADDRESS_SETS_CACHED = 16
# 9999-12-31T23:59:59Z: a block time past it has no date (the envelope's ISO timestamp).
MAX_TIMESTAMP = 253_402_300_799

_HASH_RE = re.compile(r"0x[0-9a-fA-F]{64}")
# Where a log sits in the chain: the sort key of every log list the indexer handles.
_POSITION = operator.attrgetter("block_number", "log_index")

# Each position is None (any topic), one topic, or a list of alternatives (eth_getLogs syntax).
TopicFilter = Sequence[str | Sequence[str] | None]


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The parts of a block header needed to follow the chain and notice reorgs."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int
    # The 256-byte logs bloom, read at the tip (tip_blooms.TipBlooms); None when the node
    # gave none, or one with every bit set (Lotus), and for headers read from the database.
    logs_bloom: bytes | None = None


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made
# building a RawLog a quarter of checking a log. Nothing hashes or changes a RawLog.
@dataclass(slots=True)
class RawLog:
    """One log as eth_getLogs returns it, checked, with hex in lowercase."""

    address: str
    topics: tuple[str, ...]
    data: str
    block_number: int
    block_hash: str
    transaction_hash: str
    transaction_index: int
    log_index: int
    removed: bool


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A checked eth_getLogs filter: an inclusive block range, addresses and topics."""

    from_block: int
    to_block: int
    addresses: frozenset[str]
    topics: tuple[frozenset[str] | None, ...]
    # Set: one block by its hash. A node that lacks the block answers "unknown block", or on
    # some versions an empty list: RpcClient.get_logs_at asks the header along to tell.
    block_hash: str | None = None

    @classmethod
    def build(
        cls, from_block: int, to_block: int, addresses: Sequence[str], topics: TopicFilter | None
    ) -> LogQuery:
        """Normalize and check the arguments of a query; ValueError for a caller's mistake."""
        if not 0 <= from_block <= to_block:
            raise ValueError(f"bad block range {from_block}..{to_block}")
        # An empty address list would ask the node for every log on the chain.
        if not addresses:
            raise ValueError("at least one address is required")
        if topics is not None and len(topics) > MAX_TOPICS:
            raise ValueError(f"at most {MAX_TOPICS} topic positions")
        return cls(
            from_block,
            to_block,
            _address_set(tuple(addresses)),
            tuple(_topic_set(t) for t in topics or ()),
        )

    @classmethod
    def at_block(
        cls, header: BlockHeader, addresses: Sequence[str], topics: TopicFilter | None = None
    ) -> LogQuery:
        """A query for the logs of one block, named by its hash."""
        query = cls.build(header.number, header.number, addresses, topics)
        return replace(query, block_hash=header.hash)

    def params(self) -> list[object]:
        """Return the eth_getLogs parameters of this query."""
        filter_: dict[str, object] = (
            {"blockHash": self.block_hash}
            if self.block_hash is not None
            else {"fromBlock": hex(self.from_block), "toBlock": hex(self.to_block)}
        )
        filter_["address"] = sorted(self.addresses)
        if self.topics:
            filter_["topics"] = [None if t is None else sorted(t) for t in self.topics]
        return [filter_]


def parse_header(result: object, number: int | None) -> BlockHeader:
    """Return the header in an eth_getBlockByNumber result; BlockNotFound if it is null.

    `number` is the block asked for, or None for "latest": a node has a newest block, so null
    for it is a hiccup (a backend behind a load balancer with no head to give for a moment),
    asked again like one behind, not a block that does not exist.
    """
    if result is None:
        if number is None:
            raise TransientFailure("behind", "the node answered null for the latest block")
        raise BlockNotFound(number)
    if not isinstance(result, dict):
        raise RpcResponseError(None, "block is not a JSON object", GET_BLOCK)
    header = BlockHeader(
        number=parse_quantity(result.get("number"), "block number", GET_BLOCK),
        hash=_hash(result.get("hash"), "block hash", GET_BLOCK),
        parent_hash=_hash(result.get("parentHash"), "parent hash", GET_BLOCK),
        timestamp=parse_quantity(result.get("timestamp"), "timestamp", GET_BLOCK),
        logs_bloom=_bloom(result.get("logsBloom")),
    )
    if number is not None and header.number != number:
        raise RpcResponseError(None, f"asked for block {number}, got {header.number}", GET_BLOCK)
    if header.timestamp > MAX_TIMESTAMP:
        raise RpcResponseError(None, f"block time {header.timestamp} is past year 9999", GET_BLOCK)
    return header


def check_has_block(result: object, header: BlockHeader) -> None:
    """Check that an eth_getBlockByHash result is header's block, which shows that the node
    has it; a null or other block is a transient failure: a node behind, not "no logs"."""
    if result is None:
        raise TransientFailure("behind", f"the node has no block {header.number} yet")
    found = parse_header(result, header.number)
    if found.hash != header.hash:
        raise TransientFailure(
            "behind", f"the node gives block {header.number} as {found.hash}, not {header.hash}"
        )


def parse_logs(result: object, query: LogQuery) -> list[RawLog]:
    """Return the logs of an eth_getLogs result that answers query, sorted by position.

    A log repeated whole is taken once, with a warning: a node's quirk that loses nothing.
    Two different logs at one position are an error: which one the chain holds is unknown.
    """
    if not isinstance(result, list):
        raise RpcResponseError(None, "logs are not a JSON list", GET_LOGS)
    # Checked values by their raw text: a few contracts emit most logs, and block hashes,
    # transaction hashes and topic0 repeat a lot. Two caches: an address is not a hash.
    addresses: dict[str, str] = {}
    hashes: dict[str, str] = {}
    logs = sorted((_log(item, query, addresses, hashes) for item in result), key=_POSITION)
    repeated = 0
    for earlier, later in itertools.pairwise(logs):
        if _POSITION(earlier) < _POSITION(later):
            continue
        if earlier != later:
            raise RpcResponseError(
                None, f"two different logs at {_POSITION(later)} in one answer", GET_LOGS
            )
        repeated += 1
    if repeated:
        log.warning(
            "rpc answer repeats logs, taking each once",
            repeated=repeated,
            first_block=query.from_block,
            last_block=query.to_block,
        )
        logs = [lg for lg, after in itertools.zip_longest(logs, logs[1:]) if lg != after]
    return logs


def _log(
    item: object, query: LogQuery, addresses: dict[str, str], hashes: dict[str, str]
) -> RawLog:
    """Return one checked log of an eth_getLogs result."""
    if not isinstance(item, dict):
        raise RpcResponseError(None, "log is not a JSON object", GET_LOGS)
    address = item.get("address")
    if not isinstance(address, str):
        raise RpcResponseError(None, f"log from an address not asked for: {address!r}", GET_LOGS)
    lower_address = addresses.get(address)
    if lower_address is None:
        lower_address = address.lower()
        # The asked-for set is lowercase: without the prefix check "0X" would match it too.
        if lower_address not in query.addresses or not address.startswith("0x"):
            raise RpcResponseError(
                None, f"log from an address not asked for: {address!r}", GET_LOGS
            )
        addresses[address] = lower_address
    topics = item.get("topics")
    if not isinstance(topics, list) or len(topics) > MAX_TOPICS:
        raise RpcResponseError(None, "log topics are not a list of at most 4", GET_LOGS)
    data = item.get("data")
    if not isinstance(data, str) or not _is_hex_bytes(data):
        raise RpcResponseError(None, "log data is not hex bytes", GET_LOGS)
    removed = item.get("removed", False)
    if not isinstance(removed, bool):
        raise RpcResponseError(None, "log removed flag is not a boolean", GET_LOGS)
    if removed:  # its block was replaced while the node answered: ask again
        raise ReorgDuringFetch("a log in the answer is marked removed")
    # Positional, in field order: keywords cost a third more here, for every log.
    log = RawLog(
        lower_address,
        tuple([_hash(t, "topic", GET_LOGS, hashes) for t in topics]),
        data.lower(),
        parse_quantity(item.get("blockNumber"), "log block number", GET_LOGS),
        _hash(item.get("blockHash"), "log block hash", GET_LOGS, hashes),
        _hash(item.get("transactionHash"), "transaction hash", GET_LOGS, hashes),
        parse_quantity(item.get("transactionIndex"), "transaction index", GET_LOGS),
        parse_quantity(item.get("logIndex"), "log index", GET_LOGS),
        removed,
    )
    if not query.from_block <= log.block_number <= query.to_block:
        raise RpcResponseError(
            None,
            f"log in block {log.block_number}, outside {query.from_block}..{query.to_block}",
            GET_LOGS,
        )
    if query.block_hash is not None and log.block_hash != query.block_hash:
        raise RpcResponseError(None, f"log of block {log.block_hash}, not the one asked", GET_LOGS)
    for position, allowed in enumerate(query.topics):
        if allowed is not None and (
            position >= len(log.topics) or log.topics[position] not in allowed
        ):
            raise RpcResponseError(None, f"log topic {position} was not asked for", GET_LOGS)
    return log


def _is_hex_bytes(text: str) -> bool:
    """Whether text is 0x followed by an even number of hex digits, in any letter case."""
    # a2b_hex is as strict as the pattern 0x([0-9a-fA-F]{2})* (no whitespace, unlike
    # bytes.fromhex; a non-ASCII str is a ValueError) and a few times faster on log data.
    if not text.startswith("0x"):
        return False
    try:
        binascii.a2b_hex(text[2:])
    except ValueError:  # binascii.Error is one
        return False
    return True


def _bloom(value: object) -> bytes | None:
    """Return a header's logs bloom as bytes: None if absent (some nodes leave it out) or
    full (Lotus sets every bit, computing none), which says nothing either way."""
    if value is None:
        return None
    # A length check first: a2b_hex then decodes 256 bytes at most (~0.5 us; 2-core VM).
    if isinstance(value, str) and len(value) == 2 + 2 * BLOOM_BYTES and value.startswith("0x"):
        try:
            bloom = binascii.a2b_hex(value[2:])
        except ValueError:  # binascii.Error is one; so is a non-ASCII str
            pass
        else:
            return None if bloom == FULL_BLOOM else bloom
    raise RpcResponseError(None, f"logs bloom is not 256 hex bytes: {value!r:.80}", GET_BLOCK)


def _hash(value: object, what: str, method: str, checked: dict[str, str] | None = None) -> str:
    """Return a 32-byte hex value in lowercase; checked remembers values already seen."""
    if isinstance(value, str):
        if checked is not None and (known := checked.get(value)) is not None:
            return known
        if _HASH_RE.fullmatch(value):
            lower = value.lower()
            if checked is not None:
                checked[value] = lower
            return lower
    raise RpcResponseError(None, f"{what} is not a 32-byte hex string: {value!r:.80}", method)


@functools.lru_cache(maxsize=ADDRESS_SETS_CACHED)
def _address_set(addresses: tuple[str, ...]) -> frozenset[str]:
    """Normalize the addresses of a filter; ValueError for a malformed address."""
    # Cached: the follower asks the same chunks of up to a thousand addresses for every range
    # and, at the tip, for every block; checking each address again cost ~1 ms per query.
    return frozenset(normalize_address(a) for a in addresses)


def _topic_set(topic: str | Sequence[str] | None) -> frozenset[str] | None:
    """Normalize one topic position of a filter; ValueError for a malformed topic."""
    if topic is None:
        return None
    alternatives = [topic] if isinstance(topic, str) else list(topic)
    if not alternatives:
        raise ValueError("a topic position lists no alternatives; use None for any topic")
    for value in alternatives:
        if not _HASH_RE.fullmatch(value):
            raise ValueError(f"topic is not a 32-byte hex string: {value!r:.80}")
    return frozenset(value.lower() for value in alternatives)
