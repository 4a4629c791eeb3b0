"""Settings of `kektech doctor` and `kektech check`, read from the same .env as the services.

They extend IndexerSettings, so DATABASE_URL, REDIS_URL, RPC_PROVIDER_URL, CHAIN_ID,
REDIS_STREAM_KEY and INDEXER_HTTP_HOST/PORT mean exactly what they mean to the indexer. The
variables added here are prefixed OPS_ (both commands), DOCTOR_ or MONITOR_; PM2_HOME is
PM2's own variable. Every default suits the production layout (docs/operations.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from shared.config_types import Host, Port, check_host, check_url, split_csv
from shared.indexer_settings import IndexerSettings
from shared.settings import DAY_SECONDS, INT64_MAX

__all__ = ["OpsSettings", "parse_endpoint"]

DEFAULT_APPS = ("kektech-event-indexer", "kektech-websocket-server")


def parse_endpoint(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:443") into its parts; raise ValueError."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected host:port, e.g. ws.kektech.xyz:443")
    return check_host(host), int(port)


class OpsSettings(IndexerSettings):
    """What the doctor and the monitor probe, and their thresholds."""

    # The ops variables are this class's own fields: a misspelled one is refused here.
    env_names_of_others: ClassVar[tuple[str, ...]] = ()

    ops_timeout: float = Field(
        default=5.0, gt=0, le=120, description="Seconds each probe may take before it fails."
    )
    ops_pm2_bin: str = Field(
        default="pm2",
        min_length=1,
        description="pm2 executable; when `pm2` is not on PATH, ./node_modules/.bin/pm2 is used.",
    )
    pm2_home: str = Field(
        default="", description="PM2's home directory (PM2_HOME); empty means ~/.pm2."
    )
    ops_pm2_apps: Annotated[tuple[str, ...], NoDecode] = Field(
        default=DEFAULT_APPS, description="PM2 app names that must be online."
    )
    ops_tls_endpoint: str = Field(
        default="ws.kektech.xyz:443", description="host:port whose certificate is checked."
    )
    ops_tls_ca_file: str = Field(
        default="", description="CA bundle to verify it with; empty uses the system's."
    )
    doctor_broadcaster_host: Host = Field(default="127.0.0.1")
    doctor_broadcaster_ports: Annotated[tuple[Port, ...], NoDecode] = Field(
        default=(9465, 9466),
        description="Health ports (BROADCASTER_HTTP_PORT) of every broadcaster instance.",
    )
    doctor_max_lag_blocks: int = Field(
        le=INT64_MAX,
        default=100,
        ge=0,
        description="Indexer lag above which catching up is a failure.",
    )
    doctor_nginx_bin: str = Field(default="nginx", min_length=1)
    doctor_nginx_conf: str = Field(default="/etc/nginx/nginx.conf", min_length=1)
    doctor_tls_warn_days: float = Field(default=14.0, ge=0)
    doctor_tls_fail_days: float = Field(default=7.0, ge=0)
    monitor_ws_url: str = Field(
        default="wss://ws.kektech.xyz/ws", description="Public WebSocket URL probed by check."
    )
    monitor_down_after: float = Field(
        default=300.0,
        ge=0,
        le=DAY_SECONDS,
        description="Seconds the endpoint must be down before an alert.",
    )
    monitor_state_file: Path = Field(
        default=Path("/var/lib/kektech/monitor.json"),
        description="Where check remembers first failures and PM2 restart counts between runs.",
    )
    monitor_max_restarts: int = Field(
        le=INT64_MAX,
        default=3,
        ge=0,
        description="Restarts per window above which a PM2 process alerts.",
    )
    monitor_restart_window: float = Field(
        default=3600.0, gt=0, le=DAY_SECONDS, description="Seconds."
    )
    monitor_memory_percent: float = Field(
        default=80.0, gt=0, le=100, description="Memory in use (MemAvailable) that alerts."
    )
    monitor_tls_days: float = Field(
        default=7.0, ge=0, description="Certificate lifetime left below which check alerts."
    )

    @field_validator("ops_pm2_apps", "doctor_broadcaster_ports", mode="before")
    @classmethod
    def _split_ops_lists(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("ops_pm2_apps", "doctor_broadcaster_ports")
    @classmethod
    def _not_empty(cls, value: tuple[object, ...]) -> tuple[object, ...]:
        # Empty, the check would have nothing to look at and pass in silence.
        if not value:
            raise ValueError("at least one item is required")
        return value

    @field_validator("monitor_state_file", mode="before")
    @classmethod
    def _state_file(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("a file path is required")
        return value

    @field_validator("ops_tls_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parse_endpoint(value)
        return value

    @field_validator("monitor_ws_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        check_url(value, frozenset({"ws", "wss"}))
        # The URL is printed in alerts and kept in the state file, and the probe sends no
        # credentials: a user or password in it could only leak. (The message never quotes it.)
        if "@" in urlsplit(value).netloc:
            raise ValueError("must name no user or password: the probe is a browser's, anonymous")
        return value

    @field_validator("doctor_tls_fail_days")
    @classmethod
    def _fail_below_warn(cls, value: float, info: ValidationInfo) -> float:
        warn = info.data.get("doctor_tls_warn_days")
        if warn is not None and value > warn:
            raise ValueError("must not be above DOCTOR_TLS_WARN_DAYS")
        return value

    def pm2_home_path(self) -> Path:
        """The PM2 home the apps run under."""
        return Path(self.pm2_home).expanduser() if self.pm2_home else Path.home() / ".pm2"
