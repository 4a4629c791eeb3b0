"""Redis: PING, and the length of the event stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ops.errors import ProbeError

__all__ = ["StreamInfo", "probe_redis"]

_AUTH_FIX = "check the user and password in REDIS_URL against the Redis ACL (ACL LIST)"


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """The stream as Redis reports it; length None when the key does not exist."""

    length: int | None


async def probe_redis(url: str, *, stream_key: str, within: float) -> StreamInfo:
    """PING, then XLEN the stream; ProbeError naming what failed."""
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=within, retry=Retry(NoBackoff(), 0)
    )
    try:
        async with asyncio.timeout(within):
            await client.ping()
            kind = await client.type(stream_key)
            if kind in (b"none", "none"):
                return StreamInfo(None)
            if kind not in (b"stream", "stream"):
                raise ProbeError(f"{stream_key} is a {kind!r}, not a stream")
            return StreamInfo(int(await client.xlen(stream_key)))
    except TimeoutError:
        raise ProbeError(f"no answer within {within:g} s") from None
    except redis.exceptions.AuthenticationError as exc:
        raise ProbeError(f"authentication failed: {exc}", fix=_AUTH_FIX) from None
    except redis.exceptions.NoPermissionError as exc:
        raise ProbeError(f"the Redis user lacks a permission: {exc}", fix=_AUTH_FIX) from None
    except redis.exceptions.ConnectionError as exc:
        raise ProbeError(f"cannot connect: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise ProbeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        await client.aclose()
