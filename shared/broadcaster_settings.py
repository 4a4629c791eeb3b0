"""Settings of the WebSocket broadcaster, read from the environment and an optional .env file."""

from __future__ import annotations

import re
from ipaddress import ip_network
from typing import Annotated, Any

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from shared.config_types import Host, IpNetwork, Origin, Port, split_csv
from shared.settings import DAY_SECONDS, INT64_MAX, ServiceSettings

__all__ = ["BroadcasterSettings"]

# One message every 20 s: the deployed frontend pings every 30 s, so a lower rate would
# rate-limit it once its burst is spent (1e-300, a slip, let a client send one message ever).
MIN_RATE_LIMIT = 0.05
# A group name as useradd and groupadd make them (at most 32 characters): a list, a gid or a
# stray option is a slip, and a number would be read as a name by getgrnam anyway.
GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


class BroadcasterSettings(ServiceSettings):
    """Settings of the WebSocket broadcaster."""

    ws_host: Host = Field(default="127.0.0.1", description="WebSocket listen host.")
    ws_port: Port = Field(default=3180, description="WebSocket listen port.")
    ws_path: str = Field(default="/ws", description="HTTP path that upgrades to WebSocket.")
    ws_max_connections_per_ip: int = Field(
        le=INT64_MAX,
        default=200,
        ge=1,
        description=(
            "Per client IP (IPv4 address, or IPv6 /64). Shared by everyone behind one address"
            " (a NAT, a carrier's), and counting connections the deployed frontend leaves open"
            " (docs/broadcaster.md)."
        ),
    )
    ws_max_connections: int = Field(
        le=INT64_MAX,
        default=20_000,
        ge=1,
        description=(
            "Connections this process holds on its public listeners (WebSockets, handshakes "
            "and HTTP requests together); more are answered 503 at once. Lowered at start to "
            "leave the process open files for itself (Redis, the metrics port)."
        ),
    )
    ws_max_subscriptions: int = Field(
        le=INT64_MAX, default=100, ge=1, description="Channels per connection."
    )
    ws_allowed_origins: Annotated[tuple[Origin, ...], NoDecode] = Field(
        default=(), description="Comma-separated Origin values; empty allows every origin."
    )
    ws_max_message_bytes: int = Field(
        le=INT64_MAX, default=16_384, ge=256, description="Largest client frame."
    )
    ws_send_buffer_bytes: int = Field(
        le=INT64_MAX,
        default=1_048_576,
        ge=4096,
        description="Unsent bytes per client before it is dropped.",
    )
    ws_heartbeat_interval: float = Field(
        default=30.0, gt=0, le=DAY_SECONDS, description="Seconds between pings."
    )
    ws_heartbeat_timeout: float = Field(
        default=20.0,
        gt=0,
        le=DAY_SECONDS,
        description="Seconds a client has to answer a ping before it is closed.",
    )
    ws_handshake_timeout: float = Field(
        default=10.0,
        gt=0,
        le=DAY_SECONDS,
        description="Seconds a new connection has to complete its handshake.",
    )
    ws_rate_limit: float = Field(
        default=20.0,
        ge=MIN_RATE_LIMIT,
        description="Client messages per second (at least 0.05: the frontend pings every 30 s).",
    )
    ws_trusted_proxies: Annotated[tuple[IpNetwork, ...], NoDecode] = Field(
        default=(ip_network("127.0.0.1"), ip_network("::1")),
        description="Comma-separated proxy IPs or CIDR blocks whose X-Forwarded-For is believed.",
    )
    ws_unix_socket: str = Field(
        default="",
        description=(
            "Path of a Unix socket to serve on as well, for Nginx on the same host "
            "(proxy_pass http://unix:PATH:); empty for none."
        ),
    )
    ws_unix_socket_group: str = Field(
        default="",
        description=(
            "Group to give the Unix socket to (one this service's user and Nginx's share); "
            "empty keeps the process's group."
        ),
    )
    ws_reuse_port: bool = Field(
        default=False, description="Listen with SO_REUSEPORT so instances can share WS_PORT."
    )
    ws_max_glob_patterns: int = Field(
        le=INT64_MAX,
        default=256,
        ge=0,
        description=(
            "Distinct wildcard patterns other than a trailing * (e.g. events:*_placed) all "
            "clients together may hold; each costs a match per event. One client IP may "
            "bring a 64th of them (at least 1) into use."
        ),
    )
    ws_max_glob_patterns_per_ip: int = Field(
        le=INT64_MAX,
        default=16,
        ge=0,
        description=(
            "Wildcard subscriptions other than a trailing * that the connections of one "
            "client IP may hold together, so that one client cannot use up "
            "WS_MAX_GLOB_PATTERNS."
        ),
    )
    ws_replay_limit: int = Field(
        le=INT64_MAX,
        default=10_000,
        ge=0,
        description="Most events a resume (subscribe with since) may reach back; older is a miss.",
    )
    ws_history_size: int = Field(
        le=INT64_MAX,
        default=5_000,
        ge=0,
        description="Recent events kept in memory to answer resumes.",
    )
    ws_replay_stream_budget: int = Field(
        le=INT64_MAX,
        default=200_000,
        ge=0,
        description=(
            "Stream entries the resumes of all clients together may read from Redis per "
            "minute (that many at once, then refilled evenly over the minute); past it a "
            "resume that memory cannot answer reads nothing and gets recovered: false. "
            "Resumes answered from memory (WS_HISTORY_SIZE) are not counted; 0 answers "
            "resumes from memory only."
        ),
    )
    broadcaster_redis_timeout: float = Field(
        default=10.0,
        ge=0.5,
        le=DAY_SECONDS,
        description="Seconds without an answer after which the Redis connection counts as dead.",
    )
    broadcaster_http_host: Host = Field(default="127.0.0.1", description="Metrics host.")
    broadcaster_http_port: Port = Field(default=9465, description="Metrics and health port.")
    broadcaster_instance: int = Field(
        default=0,
        ge=0,
        le=63,
        description=(
            "Index of this instance (PM2 sets it per instance, see ecosystem.config.js); added "
            "to WS_PORT (unless WS_REUSE_PORT: then shared) and BROADCASTER_HTTP_PORT, so "
            "instance i listens on base + i, and appended to WS_UNIX_SOCKET (PATH.i) for i > 0."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _offset_ports_by_instance(cls, data: Any) -> Any:
        """Instance i of one PM2 app listens on WS_PORT + i and BROADCASTER_HTTP_PORT + i
        (and WS_UNIX_SOCKET.i for i > 0); with WS_REUSE_PORT all share WS_PORT.

        PM2 keeps only the instance index per process across `pm2 reload ecosystem.config.js
        --update-env` (it gives every instance of an app the same env), so the ports must be
        derived from it here rather than written per instance in the ecosystem file.
        """
        if not isinstance(data, dict):
            return data
        try:  # read as the field reads it ("1.0" is 1), so the ports follow the index
            instance = TypeAdapter(int).validate_python(data.get("BROADCASTER_INSTANCE", 0))
        except ValidationError:
            return data  # the field's own validation reports it
        if not 0 < instance <= 63:
            return data
        data = dict(data)
        offset = [("BROADCASTER_HTTP_PORT", "broadcaster_http_port")]
        try:  # with SO_REUSEPORT the instances share WS_PORT: the kernel spreads connections
            shared = TypeAdapter(bool).validate_python(data.get("WS_REUSE_PORT", False))
        except ValidationError:
            shared = False  # the field's own validation reports it
        if not shared:
            offset.append(("WS_PORT", "ws_port"))
        for key, name in offset:
            base = str(data.get(key, cls.model_fields[name].default)).strip()
            if base.isdigit():  # otherwise left as given for the port's own validation
                data[key] = int(base) + instance
        if isinstance(path := data.get("WS_UNIX_SOCKET"), str) and path.strip():
            data["WS_UNIX_SOCKET"] = f"{path.strip()}.{instance}"
        return data

    @field_validator("ws_allowed_origins", "ws_trusted_proxies", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("ws_unix_socket_group")
    @classmethod
    def _group_of_a_socket(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if not value:
            return value
        if not GROUP_NAME.fullmatch(value):
            raise ValueError(
                "must be one group name (letters, digits, _ . -, starting with a letter or _)"
            )
        if not info.data.get("ws_unix_socket"):
            raise ValueError("needs WS_UNIX_SOCKET: there is no socket to give the group")
        return value

    @field_validator("ws_unix_socket")
    @classmethod
    def _socket_path_is_absolute(cls, value: str) -> str:
        # Relative, it would be found from whatever directory PM2 starts the service in;
        # Nginx's proxy_pass http://unix:PATH: names an absolute one.
        value = value.strip()
        if value and not value.startswith("/"):
            raise ValueError("must be an absolute path (or empty for none)")
        return value

    @field_validator("broadcaster_http_port")
    @classmethod
    def _ports_differ(cls, value: int, info: ValidationInfo) -> int:
        # Both listeners of an instance on one port: the second bind fails at start.
        if value == info.data.get("ws_port"):
            raise ValueError(
                f"{value} is also WS_PORT (after the instance offset): the operations port"
                " needs a port of its own"
            )
        return value

    @field_validator("ws_path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        # Requests are matched by their path without the query: no client could reach one
        # with a query, a fragment or a blank (a quoted .env value's stray space).
        if any(c in value for c in "?#") or any(c.isspace() for c in value):
            raise ValueError("must be a path alone: no query, fragment or blank")
        return value
