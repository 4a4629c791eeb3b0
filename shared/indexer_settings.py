"""Settings of the chain indexer, read from the environment and an optional .env file."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from shared.config_types import (
    Address,
    Host,
    HttpUrlSecret,
    OptionalAddress,
    OptionalHttpsUrl,
    OptionalSecret,
    Port,
    PostgresUrlSecret,
    split_csv,
)
from shared.settings import DAY_SECONDS, INT64_MAX, ServiceSettings

__all__ = ["IndexerSettings"]

# The shortest POLL_INTERVAL: twenty head polls (JSON-RPC requests) a second already outpace
# BasedAI's blocks; less is a slip (milliseconds for seconds) that floods the node.
MIN_POLL_INTERVAL = 0.05

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
        le=INT64_MAX, default=0, ge=0, description="First block to index when the DB is empty."
    )
    supabase_url: OptionalHttpsUrl = None
    supabase_service_role_key: OptionalSecret = None
    confirmations: int = Field(
        le=INT64_MAX, default=0, ge=0, description="Blocks to stay behind the head."
    )
    poll_interval: float = Field(
        default=1.0, le=60, description="Seconds between head polls (at least 0.05)."
    )
    reorg_window: int = Field(
        le=INT64_MAX, default=64, ge=1, description="Recent block hashes kept for reorgs."
    )
    rpc_timeout: float = Field(
        default=10.0, gt=0, le=DAY_SECONDS, description="Seconds per JSON-RPC request."
    )
    rpc_max_retries: int = Field(
        le=INT64_MAX, default=5, ge=0, description="Retries of a failed RPC request."
    )
    logs_range_min: int = Field(
        le=INT64_MAX, default=1, ge=1, description="Smallest eth_getLogs block range."
    )
    logs_range_max: int = Field(
        le=INT64_MAX, default=10_000, ge=1, description="Largest eth_getLogs range."
    )
    logs_range_initial: int = Field(
        le=INT64_MAX, default=2000, ge=1, description="First eth_getLogs range."
    )
    db_statement_cache_size: int = Field(
        le=INT64_MAX,
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
        le=INT64_MAX,
        default=2000,
        ge=1,
        description=(
            "Events to aim for per committed batch: bounds the indexer's memory (two batches are"
            " in memory while catching up) against the cost of a commit."
        ),
    )
    logs_max_addresses: int = Field(
        le=INT64_MAX,
        default=1000,
        ge=1,
        description="Most contract addresses in one eth_getLogs filter.",
    )
    lease_ttl: float = Field(
        default=15.0,
        ge=1,
        le=300,
        description="Seconds the write lease lasts unrenewed; a standby takes over after it.",
    )
    outbox_keep: int = Field(
        le=INT64_MAX, default=10_000, ge=0, description="Published outbox rows kept for inspection."
    )
    indexer_http_host: Host = Field(default="127.0.0.1", description="Metrics host.")
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
