"""The public WebSocket endpoint: a real handshake and a ping answered by a pong."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from ops.errors import ProbeError
from ops.probes.tls import tls_context

__all__ = ["probe_websocket"]


async def probe_websocket(url: str, *, ca_file: str, within: float) -> None:
    """Return when url accepts a WebSocket and answers a ping; ProbeError saying what failed."""
    secure = urlsplit(url).scheme == "wss"
    try:
        context = tls_context(ca_file) if secure else None
        async with asyncio.timeout(within):
            async with connect(
                url, ssl=context, open_timeout=None, close_timeout=1, compression=None
            ) as ws:
                pong = await ws.ping()
                await pong
    except TimeoutError:
        raise ProbeError(f"no handshake and pong within {within:g} s") from None
    except InvalidStatus as exc:
        raise ProbeError(f"handshake refused with HTTP {exc.response.status_code}") from None
    except (InvalidHandshake, WebSocketException) as exc:
        raise ProbeError(f"{type(exc).__name__}: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise ProbeError(f"certificate does not verify: {exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"cannot connect: {exc.strerror or exc}") from None
