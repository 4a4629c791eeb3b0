"""The text of a WebSocket opening handshake request, for tests that speak raw HTTP."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping


def handshake_request(
    host: str,
    *,
    path: str = "/ws",
    key: str | None = None,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """An RFC 6455 upgrade request (a random key unless given); `headers` override or add
    header fields, and an empty value leaves a field out."""
    fields = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key if key is not None else base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value)
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode()
