"""Settings of both services, read from the environment and an optional .env file."""

from __future__ import annotations

import re
import sys
from ipaddress import ip_network
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import (
    AliasGenerator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from shared.config_types import (
    MIN_SECRET_FRAGMENT,
    Address,
    HttpUrlSecret,
    IpNetwork,
    OptionalAddress,
    OptionalHttpsUrl,
    OptionalSecret,
    Origin,
    Port,
    PostgresUrlSecret,
    RedisUrlSecret,
    split_csv,
    url_secret_fragments,
)
from shared.env_file import check_env_file, env_files
from shared.errors import ConfigError

__all__ = [
    "BroadcasterSettings",
    "IndexerSettings",
    "LogFormat",
    "LogLevel",
    "ServiceSettings",
    "load_settings",
    "settings_or_exit",
]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["auto", "json", "console"]
SettingsT = TypeVar("SettingsT", bound="ServiceSettings")
# The most a timeout or interval may be: longer is a slip (milliseconds, a stray digit), and
# the event loop cannot wait past about 24.8 days at all (OverflowError at the first wait).
DAY_SECONDS = 86_400.0
# The shortest POLL_INTERVAL: twenty head polls (JSON-RPC requests) a second already outpace
# BasedAI's blocks; less is a slip (milliseconds for seconds) that floods the node.
MIN_POLL_INTERVAL = 0.05
# A group name as useradd and groupadd make them (at most 32 characters): a list, a gid or a
# stray option is a slip, and a number would be read as a name by getgrnam anyway.
GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


class ServiceSettings(BaseSettings):
    """Settings every service reads: Redis, the chain, logging."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        # Both services and the ops tools share one .env, so each skips the others' variables;
        # a name none of them reads is refused by load_settings (shared.env_file).
        extra="ignore",
        frozen=True,
        # inf and nan (1e999 reads as inf) are no numbers of seconds or days: a timeout of inf
        # overflows the event loop, a delay of inf silences an alert for good.
        allow_inf_nan=False,
        # The variable is exactly the upper-case field name: REDIS_URL, never redis_url.
        case_sensitive=True,
        alias_generator=AliasGenerator(validation_alias=str.upper),
    )

    # Names (or prefixes, ending in _) of .env variables that another reader checks: the ops
    # tools' (ops/settings.py, which shared cannot import). The services let them through
    # unread; the tools' own class checks them exactly (it sets this to ()).
    env_names_of_others: ClassVar[tuple[str, ...]] = ("OPS_", "DOCTOR_", "MONITOR_", "PM2_HOME")

    redis_url: RedisUrlSecret = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://, rediss:// or unix:// URL; may carry a password.",
    )
    chain_id: int = Field(default=32323, gt=0, description="EVM chain id (32323 is BasedAI).")
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: LogFormat = Field(
        default="auto", description="json, console, or auto (console on a TTY, else json)."
    )
    redis_stream_key: str = Field(
        default="kektech:events", min_length=1, description="Stream the indexer publishes to."
    )
    redis_stream_maxlen: int = Field(
        default=100_000, ge=1000, description="Approximate cap on the stream's length (XADD)."
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalize_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    def log_secrets(self) -> tuple[str, ...]:
        """Return the plain secret strings (and secret parts of URLs) that logs must never show."""
        found: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if isinstance(item, SecretStr):
                    plain = item.get_secret_value()
                    if "://" in plain:
                        found += url_secret_fragments(plain)
                    elif len(plain) >= MIN_SECRET_FRAGMENT:
                        found.append(plain)
        return tuple(dict.fromkeys(found))


# The contract roles validated before each one (fields are validated in order).
ROLES_CHECKED_BEFORE = {
    "resolution_manager_address": ("market_factory_address",),
    "reward_distributor_address": ("market_factory_address", "resolution_manager_address"),
}


class IndexerSettings(ServiceSettings):
    """Settings of the chain indexer."""

    database_url: PostgresUrlSecret = Field(
        default=SecretStr("postgresql://kektech@127.0.0.1:5432/kektech"),
        description="postgres:// or postgresql:// DSN; may carry a password.",
    )
    rpc_provider_url: Annotated[tuple[HttpUrlSecret, ...], NoDecode] = Field(
        default=(SecretStr("http://127.0.0.1:8545"),),
        description="Comma-separated JSON-RPC URLs, tried in order; often carry API keys.",
    )
    market_factory_address: Annotated[tuple[Address, ...], NoDecode] = Field(
        default=(), description="Comma-separated factory addresses (every deployed version)."
    )
    resolution_manager_address: OptionalAddress = None
    reward_distributor_address: OptionalAddress = None
    start_block: int = Field(
        default=0, ge=0, description="First block to index when the DB is empty."
    )
    supabase_url: OptionalHttpsUrl = None
    supabase_service_role_key: OptionalSecret = None
    confirmations: int = Field(default=0, ge=0, description="Blocks to stay behind the head.")
    poll_interval: float = Field(
        default=1.0, le=60, description="Seconds between head polls (at least 0.05)."
    )
    reorg_window: int = Field(default=64, ge=1, description="Recent block hashes kept for reorgs.")
    rpc_timeout: float = Field(
        default=10.0, gt=0, le=DAY_SECONDS, description="Seconds per JSON-RPC request."
    )
    rpc_max_retries: int = Field(default=5, ge=0, description="Retries of a failed RPC request.")
    logs_range_min: int = Field(default=1, ge=1, description="Smallest eth_getLogs block range.")
    logs_range_max: int = Field(default=10_000, ge=1, description="Largest eth_getLogs range.")
    logs_range_initial: int = Field(default=2000, ge=1, description="First eth_getLogs range.")
    db_statement_cache_size: int = Field(
        default=100,
        ge=0,
        description=(
            "asyncpg prepared-statement cache size; 0 disables prepared statements, which is "
            "required behind Supabase's transaction pooler (port 6543) or PgBouncer in "
            "transaction mode."
        ),
    )
    db_command_timeout: float = Field(
        default=60.0,
        gt=0,
        le=DAY_SECONDS,
        description=(
            "Seconds one database statement may take. Past it the connection is dropped and "
            "the indexer exits for PM2 to restart it: a dead network path to the database "
            "(which answers nothing and closes nothing) would otherwise stall it for good."
        ),
    )
    batch_events: int = Field(
        default=2000,
        ge=1,
        description=(
            "Events to aim for per committed batch: bounds the indexer's memory (two batches are"
            " in memory while catching up) against the cost of a commit."
        ),
    )
    logs_max_addresses: int = Field(
        default=1000, ge=1, description="Most contract addresses in one eth_getLogs filter."
    )
    lease_ttl: float = Field(
        default=15.0,
        ge=1,
        le=300,
        description="Seconds the write lease lasts unrenewed; a standby takes over after it.",
    )
    outbox_keep: int = Field(
        default=10_000, ge=0, description="Published outbox rows kept for inspection."
    )
    indexer_http_host: str = Field(default="127.0.0.1", min_length=1, description="Metrics host.")
    indexer_http_port: Port = Field(default=9464, description="Metrics and health port.")

    @field_validator("rpc_provider_url", "market_factory_address", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("rpc_provider_url")
    @classmethod
    def _at_least_one_rpc(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if not value:
            raise ValueError("at least one URL is required")
        return value

    @field_validator("market_factory_address")
    @classmethod
    def _no_duplicate_factories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("an address is listed twice")
        return value

    @field_validator("resolution_manager_address", "reward_distributor_address")
    @classmethod
    def _one_role_per_address(cls, value: str | None, info: ValidationInfo) -> str | None:
        """The same contract in two roles would have its logs decoded as one of them only."""
        for name in ROLES_CHECKED_BEFORE.get(info.field_name or "", ()):
            held = info.data.get(name)
            if value is not None and value in (held if isinstance(held, tuple) else (held,)):
                raise ValueError(f"is also in {name.upper()}: each contract has one role")
        return value

    @field_validator("poll_interval")
    @classmethod
    def _poll_not_too_often(cls, value: float) -> float:
        if value < MIN_POLL_INTERVAL:
            raise ValueError(
                f"must be at least {MIN_POLL_INTERVAL} seconds: each poll is a JSON-RPC request "
                "to the node"
            )
        return value

    @field_validator("logs_range_max")
    @classmethod
    def _max_not_below_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("logs_range_min")
        if low is not None and value < low:
            raise ValueError("must not be below LOGS_RANGE_MIN")
        return value

    @field_validator("logs_range_initial")
    @classmethod
    def _initial_within_bounds(cls, value: int, info: ValidationInfo) -> int:
        low, high = info.data.get("logs_range_min"), info.data.get("logs_range_max")
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError("must be between LOGS_RANGE_MIN and LOGS_RANGE_MAX")
        return value

    def rpc_urls(self) -> list[str]:
        """Return the plain JSON-RPC URLs, API keys included, for the RPC client only."""
        return [url.get_secret_value() for url in self.rpc_provider_url]


class BroadcasterSettings(ServiceSettings):
    """Settings of the WebSocket broadcaster."""

    ws_host: str = Field(default="127.0.0.1", min_length=1, description="WebSocket listen host.")
    ws_port: Port = Field(default=3180, description="WebSocket listen port.")
    ws_path: str = Field(default="/ws", description="HTTP path that upgrades to WebSocket.")
    ws_max_connections_per_ip: int = Field(
        default=50, ge=1, description="Per client IP (IPv4 address, or IPv6 /64)."
    )
    ws_max_connections: int = Field(
        default=20_000,
        ge=1,
        description=(
            "Connections this process holds on its public listeners (WebSockets, handshakes "
            "and HTTP requests together); more are answered 503 at once. Lowered at start to "
            "leave the process open files for itself (Redis, the metrics port)."
        ),
    )
    ws_max_subscriptions: int = Field(default=100, ge=1, description="Channels per connection.")
    ws_allowed_origins: Annotated[tuple[Origin, ...], NoDecode] = Field(
        default=(), description="Comma-separated Origin values; empty allows every origin."
    )
    ws_max_message_bytes: int = Field(default=16_384, ge=256, description="Largest client frame.")
    ws_send_buffer_bytes: int = Field(
        default=1_048_576, ge=4096, description="Unsent bytes per client before it is dropped."
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
    ws_rate_limit: float = Field(default=20.0, gt=0, description="Client messages per second.")
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
        default=256,
        ge=0,
        description=(
            "Distinct wildcard patterns other than a trailing * (e.g. events:*_placed) all "
            "clients together may hold; each costs a match per event."
        ),
    )
    ws_max_glob_patterns_per_ip: int = Field(
        default=16,
        ge=0,
        description=(
            "Wildcard subscriptions other than a trailing * that the connections of one "
            "client IP may hold together, so that one client cannot use up "
            "WS_MAX_GLOB_PATTERNS."
        ),
    )
    ws_replay_limit: int = Field(
        default=10_000,
        ge=0,
        description="Most events a resume (subscribe with since) may reach back; older is a miss.",
    )
    ws_history_size: int = Field(
        default=5_000, ge=0, description="Recent events kept in memory to answer resumes."
    )
    broadcaster_redis_timeout: float = Field(
        default=10.0,
        ge=0.5,
        le=DAY_SECONDS,
        description="Seconds without an answer after which the Redis connection counts as dead.",
    )
    broadcaster_http_host: str = Field(
        default="127.0.0.1", min_length=1, description="Metrics host."
    )
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
        try:
            instance = int(data.get("BROADCASTER_INSTANCE", 0))
        except (TypeError, ValueError):
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

    @field_validator("ws_path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Build settings from the environment and .env, or raise ConfigError naming the variable."""
    try:
        _check_env_files(cls)
        return cls()
    except ValidationError as exc:
        # `from None`: the pydantic error quotes the input, which may be a secret.
        raise _config_error(cls, exc.errors(include_url=False)[0]) from None
    except SettingsError as exc:
        # Raised by a settings source; its message names the field but not the value.
        field = re.search(r'field "(\w+)"', str(exc))
        raise ConfigError(field[1].upper() if field else ".env", "cannot be read") from None
    except UnicodeDecodeError:
        raise ConfigError(".env", "file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(".env", f"file cannot be read ({exc.strerror})") from None


def _check_env_files(cls: type[ServiceSettings]) -> None:
    """Check each .env file of cls (shared.env_file.check_env_file) before it is read.

    Only the files: the process environment also holds PM2's, the shell's and the system's
    variables. Every service and ops tool reads the one .env, so a name is known when any of
    them reads it.
    """
    encoding = cls.model_config.get("env_file_encoding") or "utf-8"
    readers = (cls, IndexerSettings, BroadcasterSettings)
    known = frozenset(name.upper() for reader in readers for name in reader.model_fields)
    for path in env_files(cls.model_config.get("env_file")):
        if path.is_file():  # an absent file is no error, as for pydantic-settings
            check_env_file(path, encoding=encoding, known=known, others=cls.env_names_of_others)


def settings_or_exit(cls: type[SettingsT]) -> SettingsT:
    """Build settings for a service's main(), or print one line to stderr and exit with 2."""
    try:
        return load_settings(cls)
    except ConfigError as exc:
        sys.stderr.write(f"kektech: {exc}\n")
        raise SystemExit(2) from None


def _config_error(cls: type[ServiceSettings], error: ErrorDetails) -> ConfigError:
    """Turn one pydantic error into a ConfigError whose reason never shows a secret.

    Pydantic's own messages are rendered from the error type and its context (bounds, the
    values expected), never from the input, and ours (ValueError in the validators) never quote
    it either, so a message is kept even when a plain value appears in it (WARN in 'WARNING').
    Only should it show a secret, by coincidence or a future message, is it replaced by the
    error type: all of a secret setting's value, the secret parts of a URL in any setting.
    """
    # A default that conflicts with another setting is reported by its field name: the
    # variable's name is that in upper case.
    variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
    if error["type"] == "missing":
        return ConfigError(variable, "required", missing=True)
    reason = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    field = cls.model_fields.get(variable.lower())
    secret = field is not None and _holds_secret(field.annotation)
    if any(part in reason for part in _secret_parts(error.get("input"), secret=secret)):
        reason = error["type"].replace("_", " ")
    if reason[:2].istitle():  # "Input should be ..." reads better mid-sentence; keep "URL ..."
        reason = reason[:1].lower() + reason[1:]
    items = [part for part in error["loc"][1:] if isinstance(part, int)]
    if items:
        reason = f"item {items[0] + 1}: {reason}"
    return ConfigError(variable, reason)


def _holds_secret(annotation: object) -> bool:
    """Whether a field's type is, or holds, a SecretStr (tuple[HttpUrlSecret, ...], say)."""
    return annotation is SecretStr or any(_holds_secret(arg) for arg in get_args(annotation))


def _secret_parts(value: object, *, secret: bool) -> list[str]:
    """The parts of an input an error message must not show: all of a secret setting's value,
    and the secret parts of a URL in any setting (a DSN pasted into the wrong variable)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return []
    parts = url_secret_fragments(value) if "://" in value else []
    return [value, *parts] if secret and value else parts
