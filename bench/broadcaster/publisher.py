"""`python -m bench.broadcaster.publisher`: append stamped events to the stream at a rate.

Writes exactly what the indexer writes (entry ID `<seq>-0`; fields seq, channels, event; one
MULTI/EXEC per batch), with the wall-clock send time in ms in the envelope args as `sentAt`,
so the load generator can measure publish-to-receive latency. Events rotate over --markets
market addresses (0x00..01, 0x00..02, ...), the ones the load generator subscribes to: event
seq s goes to market_address(s % markets).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared.envelope import EventEnvelope

TX = "0x" + "ab" * 32
BLOCK = "0x" + "cd" * 32


def market_address(i: int) -> str:
    return "0x" + format(i + 1, "040x")


async def last_seq(client: aioredis.Redis, key: str) -> int:
    """The seq of the newest entry ever added to the stream (0 before the first)."""
    if not await client.exists(key):
        return 0
    info = await client.xinfo_stream(key)
    return int(info["last-generated-id"].split(b"-")[0])


def template(pad: int) -> dict[str, Any]:
    """A valid BetPlaced envelope as a dict, to copy and stamp per event."""
    envelope = EventEnvelope(
        type="BetPlaced",
        seq=1,
        chain_id=32323,
        contract=market_address(0),
        contract_kind="market",
        market_address=market_address(0),
        block_number=1,
        block_hash=BLOCK,
        transaction_hash=TX,
        log_index=1,
        timestamp="2025-11-06T12:00:00Z",
        args={
            "bettor": "0x70997970c51812dc3a010c7d01b50e0d17dc79c8",
            "outcome": "1",
            "outcomeName": "OUTCOME1",
            "amount": "1000000000000000000",
            "shares": "1000000000000000000",
            "timestamp": "1762430400",
            "sentAt": "0",
            **({"memo": "x" * pad} if pad else {}),
        },
    )
    return envelope.model_dump()


def stamp(base: dict[str, Any], seq: int, market: str, sent_ms: float) -> bytes:
    body = dict(base)
    args = dict(base["args"])
    args["sentAt"] = f"{sent_ms:.3f}"
    body.update(
        seq=seq,
        contract=market,
        marketAddress=market,
        logIndex=seq,
        id=f"32323:{TX}:{seq}",
        blockNumber=seq,
        args=args,
        data=args,
    )
    return orjson.dumps(body)


async def publish(
    url: str, key: str, *, rate: float, duration: float, markets: int, tick: float, pad: int
) -> int:
    """Publish rate events per second for duration seconds; return how many."""
    client = aioredis.Redis.from_url(url)
    base = template(pad)
    seq = await last_seq(client, key)
    published = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < duration:
            due = int(elapsed * rate) - published
            if due > 0:
                async with client.pipeline(transaction=True) as pipe:
                    sent_ms = time.time() * 1000
                    for _ in range(due):
                        seq += 1
                        market = market_address(seq % markets)
                        pipe.xadd(
                            key,
                            {
                                "seq": seq,
                                "channels": f"events:bet_placed market:{market}",
                                "event": stamp(base, seq, market, sent_ms),
                            },
                            id=f"{seq}-0",
                            maxlen=100_000,
                            approximate=True,
                        )
                    await pipe.execute()
                published += due
            await asyncio.sleep(tick)
    finally:
        await client.aclose()
    return published


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broadcaster.publisher")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--markets", type=int, default=1000)
    parser.add_argument("--tick", type=float, default=0.005, help="seconds between batches")
    parser.add_argument("--pad", type=int, default=0, help="extra bytes per envelope")
    args = parser.parse_args()
    count = asyncio.run(
        publish(
            args.redis_url,
            args.key,
            rate=args.rate,
            duration=args.duration,
            markets=args.markets,
            tick=args.tick,
            pad=args.pad,
        )
    )
    sys.stdout.write(orjson.dumps({"published": count}).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
