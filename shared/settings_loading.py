"""Building a service's settings: .env checks first, then one ConfigError that shows no secret."""

from __future__ import annotations

import re
import sys
from typing import TypeVar, get_args

from pydantic import SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from shared.broadcaster_settings import BroadcasterSettings
from shared.config_types import url_secret_fragments
from shared.env_file import check_env_file, env_files
from shared.errors import ConfigError
from shared.indexer_settings import IndexerSettings
from shared.settings import ServiceSettings

__all__ = ["load_settings", "settings_or_exit"]

SettingsT = TypeVar("SettingsT", bound="ServiceSettings")


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
