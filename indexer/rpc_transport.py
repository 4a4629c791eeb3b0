"""One JSON-RPC attempt over HTTP: POST a body to one endpoint, get decoded JSON or an error.

Nothing here retries; `rpc_failover.Failover.run` decides what a failure leads to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from indexer import rpc_wire as wire
from indexer.errors import RpcRangeTimedOut, RpcRangeTooLarge, RpcResponseError
from shared.config_types import public_host, url_secret_fragments

__all__ = ["MAX_ANSWER_BYTES", "Endpoint", "post"]

HEADERS = {"Content-Type": "application/json"}
REDACTED = "***"
# The largest answer read, in bytes. An endpoint's answer crosses a process boundary: a broken
# or hostile one could send gigabytes. The indexer's ranges hold about BATCH_EVENTS logs, a
# few MiB; a larger answer is refused as a range too large (a smaller range is asked), or,
# for a call that cannot be made smaller, as an unusable answer (the next endpoint is asked).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Endpoint:
    """One JSON-RPC URL and what the client has learnt about it."""

    url: str
    label: str  # "#index host[:port]" (keys in the host hidden), the only form logs show
    secrets: list[str]
    ready_at: float = 0.0  # monotonic time a Retry-After asked us to wait for
    verified: bool = False  # chain id checked
    batches_from: float = 0.0  # monotonic time to send batches again after a refusal
    # Calls per batch it took after refusing a larger batch; None: no cap seen (or lifted).
    batch_limit: int | None = None
    batches_at_limit: int = 0  # batches of more than half batch_limit taken since it was set

    @property
    def batches(self) -> bool:
        """Whether to send it JSON-RPC batches: it has not refused one lately."""
        return time.monotonic() >= self.batches_from

    @classmethod
    def from_url(cls, index: int, url: str) -> Endpoint:
        """Return the endpoint for url, the index-th in the client's list."""
        return cls(url, f"#{index} {public_host(url)}", [url, *url_secret_fragments(url)])

    def redact(self, text: str) -> str:
        """Return text with the URL and its secret parts blanked out."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


async def post(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    body: bytes,
    method: str,
    *,
    shrinkable: bool = False,
    batch: bool = False,
    max_answer: int = MAX_ANSWER_BYTES,
) -> object:
    """Send one HTTP request and return the decoded JSON answer, or raise what it calls for."""
    try:
        async with session.post(endpoint.url, data=body, headers=HEADERS) as response:
            raw = await _read_at_most(response, max_answer)
            if raw is None:
                too_large = f"an answer of more than {max_answer} bytes"
                if shrinkable:
                    raise RpcRangeTooLarge(too_large)
                raise RpcResponseError(None, too_large, method)
            status = response.status
            retry_after = response.headers.get("Retry-After")
    except TimeoutError:
        detail = f"no answer within {session.timeout.total} s"
        if shrinkable:  # an eth_getLogs range that a smaller one may replace
            raise RpcRangeTimedOut(detail) from None
        raise wire.TransientFailure("timeout", detail) from None
    except (aiohttp.ClientError, OSError) as exc:
        # `from None`: the chained exception may quote the URL; the detail is redacted.
        detail = endpoint.redact(f"{type(exc).__name__}: {exc}")
        raise wire.TransientFailure("connect", detail) from None
    wire.check_status(status, raw, retry_after, method, batch=batch, shrinkable=shrinkable)
    return wire.decode(raw)


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """Return the body of response, or None as soon as it is known to exceed limit bytes."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
