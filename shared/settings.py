"""Settings every service reads (Redis, the chain, logging): the base of each service's class."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasGenerator, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config_types import MIN_SECRET_FRAGMENT, RedisUrlSecret, url_secret_fragments

__all__ = ["DAY_SECONDS", "LogFormat", "LogLevel", "ServiceSettings"]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["auto", "json", "console"]
# The most a timeout or interval may be: longer is a slip (milliseconds, a stray digit), and
# the event loop cannot wait past about 24.8 days at all (OverflowError at the first wait).
DAY_SECONDS = 86_400.0
# The bound of every count, size and block number: what Postgres (bigint), Redis and the C
# structures below Python (a deque's maxlen, a transport's write limit) take.
INT64_MAX = 2**63 - 1


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
    chain_id: int = Field(
        le=INT64_MAX, default=32323, gt=0, description="EVM chain id (32323 is BasedAI)."
    )
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: LogFormat = Field(
        default="auto", description="json, console, or auto (console on a TTY, else json)."
    )
    redis_stream_key: str = Field(
        default="kektech:events", min_length=1, description="Stream the indexer publishes to."
    )
    redis_stream_maxlen: int = Field(
        le=INT64_MAX,
        default=100_000,
        ge=1000,
        description="Approximate cap on the stream's length (XADD).",
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
