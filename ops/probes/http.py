"""HTTP GETs of the services' health and metrics endpoints, and the metrics text format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ops.errors import ProbeError

__all__ = ["Answer", "get", "parse_metrics"]


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: status and body."""

    status: int
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object ({} when it is not one)."""
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


async def get(url: str, *, within: float) -> Answer:
    """GET url; ProbeError when nothing answers in `within` seconds."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            return Answer(response.status, await response.read())
    except TimeoutError:
        raise ProbeError(f"no answer from {url} within {within:g} s") from None
    except aiohttp.ClientConnectorError as exc:
        raise ProbeError(f"nothing answers at {url} ({exc.os_error.strerror})") from None
    except aiohttp.ClientError as exc:
        raise ProbeError(f"{url}: {type(exc).__name__}: {exc}") from None


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each metric's samples over its label sets: {"name": total}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.partition("{")[0].strip()
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals
