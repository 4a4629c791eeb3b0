"""Tip blocks held back by their blooms: when, for how long, and what is remembered."""

from __future__ import annotations

import functools

import pytest

from indexer.bloom import bloom_mask
from indexer.catalog import MARKET_CREATED
from indexer.errors import LogsNotIndexed
from indexer.metrics import Metrics
from indexer.rpc_results import BlockHeader, RawLog
from indexer.tip_blooms import TipBlooms

FACTORY = "0x" + "fa" * 20
MARKET = "0x" + "4d" * 20
OTHER = "0x" + "07" * 20
FOREIGN_TOPIC = "0x" + "ab" * 32
GRACE = 2.0


def bloom_of(*items: str) -> bytes:
    """A bloom holding exactly these addresses and topics."""
    return functools.reduce(int.__or__, map(bloom_mask, items), 0).to_bytes(256, "big")


def header(number: int, *items: str) -> BlockHeader:
    """Block `number` whose bloom holds `items`, None if there are none."""
    return BlockHeader(
        number=number,
        hash="0x" + f"{number:064x}",
        parent_hash="0x" + "00" * 32,
        timestamp=0,
        logs_bloom=bloom_of(*items) if items else None,
    )


def log_of(block: BlockHeader) -> RawLog:
    return RawLog(
        FACTORY, (MARKET_CREATED.topic0,), "0x", block.number, block.hash, "0x", 0, 0, False
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def blooms(metrics: Metrics, clock: Clock) -> TipBlooms:
    return TipBlooms(metrics, grace=GRACE, clock=clock)


def accepted(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("kektech_indexer_bloom_accepted_blocks_total")
    assert value is not None
    return value


def test_an_empty_block_whose_bloom_names_a_tracked_event_waits_out_the_grace(
    blooms: TipBlooms, metrics: Metrics, clock: Clock
) -> None:
    """Held back while within the grace, counted from when it was first found doubtful; then
    taken (a bloom false positive), and counted."""
    doubtful = header(11, MARKET, MARKET_CREATED.topic0)
    with pytest.raises(LogsNotIndexed, match="block 11"):
        blooms.check([header(10), doubtful], [], [{FACTORY, MARKET}])
    clock.now += GRACE - 0.1
    with pytest.raises(LogsNotIndexed):
        blooms.check([header(10), doubtful, header(12)], [], [{FACTORY, MARKET}])
    clock.now += 0.1
    blooms.check([header(10), doubtful, header(12)], [], [{FACTORY, MARKET}])
    assert accepted(metrics) == 1
    with pytest.raises(LogsNotIndexed):  # stored: forgotten, as the cursor is past it
        blooms.check([doubtful], [], [{MARKET}])


@pytest.mark.parametrize(
    "items",
    [(MARKET,), (MARKET_CREATED.topic0,), (OTHER, MARKET_CREATED.topic0), (MARKET, FOREIGN_TOPIC)],
    ids=["address-only", "topic-only", "untracked-address", "foreign-topic"],
)
def test_a_bloom_without_both_a_tracked_address_and_an_event_lets_the_block_through(
    blooms: TipBlooms, metrics: Metrics, items: tuple[str, ...]
) -> None:
    blooms.check([header(11, *items)], [], [{FACTORY, MARKET}])
    assert accepted(metrics) == 0


def test_each_group_of_addresses_counts(blooms: TipBlooms) -> None:
    """A market followed already, or one created in the range itself: either is tracked."""
    doubtful = header(11, MARKET, MARKET_CREATED.topic0)
    for groups in ([{FACTORY}, {MARKET}], [{FACTORY}, {}, {MARKET: FACTORY}]):
        with pytest.raises(LogsNotIndexed):
            blooms.check([doubtful], [], groups)


def test_a_block_with_logs_or_without_a_bloom_is_taken(blooms: TipBlooms, metrics: Metrics) -> None:
    """Some logs returned: the node has indexed the block. No bloom: nothing to go by."""
    with_logs = header(11, FACTORY, MARKET_CREATED.topic0)
    blooms.check([with_logs, header(12)], [log_of(with_logs)], [{FACTORY}])
    assert accepted(metrics) == 0


def test_a_block_is_forgotten_once_the_cursor_passes_it(blooms: TipBlooms, clock: Clock) -> None:
    """Remembered blocks are dropped once a range starts above them (stored, or replaced):
    the memory stays bounded, and a block seen again later is doubted afresh."""
    doubtful = header(11, MARKET, MARKET_CREATED.topic0)
    with pytest.raises(LogsNotIndexed):
        blooms.check([doubtful], [], [{MARKET}])
    clock.now += GRACE
    blooms.check([header(12)], [], [{MARKET}])  # block 11 stored, or replaced
    with pytest.raises(LogsNotIndexed):
        blooms.check([doubtful], [], [{MARKET}])  # not taken at once: its wait begins again
