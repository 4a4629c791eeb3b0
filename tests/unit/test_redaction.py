"""Tests of shared.redaction: secrets never survive into a log event."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from shared.redaction import REDACTED, redact_secrets, redact_text, redact_value, secret_redactor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:pw@db.example/x", "postgresql://user:***@db.example/x"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("dsn=postgres://u:p%40ss@h:6543/db ok", "dsn=postgres://u:***@h:6543/db ok"),
        ("raw @ in password: postgres://u:p@ss@h/db", "raw @ in password: postgres://u:***@h/db"),
        ("slash in password: postgres://u:ab/cd@h/db", "slash in password: postgres://u:***@h/db"),
        ("a https://a:1@x b https://b:2@y", "a https://a:***@x b https://b:***@y"),
        ("https://node.example/rpc?apikey=abc&x=1", "https://node.example/rpc?apikey=***&x=1"),
        ("GET /v1?API_KEY=abc#frag", "GET /v1?API_KEY=***#frag"),
        ("?token=t1&access_token=t2;sig=s", "?token=***&access_token=***;sig=***"),
        ("?key=k&secret=s&password=p", "?key=***&secret=***&password=***"),
    ],
)
def test_redact_text_hides_credentials(text: str, expected: str) -> None:
    """URL passwords and secret query values are replaced by ***, the rest kept."""
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "connected to https://node.example:8545/rpc",
        "redis://cache.example:6379/0",
        "user@example.com wrote key: value",
        "https://user@host/only-a-user-name",
        "?monkey=banana&keyboard=1",
        "block 2587591 indexed in 0.2 s",
    ],
)
def test_redact_text_keeps_harmless_text(text: str) -> None:
    """Text without credentials passes through unchanged."""
    assert redact_text(text) == text


def test_sensitive_keys_are_replaced() -> None:
    """Values of keys naming a credential are replaced whatever their type."""
    event = {
        "event": "connecting",
        "password": "hunter2",
        "DB_PASSWORD": None,
        "client_secret": 42,
        "AccessToken": ["a"],
        "api_key": "k",
        "x-apikey": "k",
        "Authorization": "Bearer abc",
        "service_role": "k",
        "attempt": 3,
    }
    assert redact_secrets(None, "info", event) == {
        "event": "connecting",
        "password": REDACTED,
        "DB_PASSWORD": REDACTED,
        "client_secret": REDACTED,
        "AccessToken": REDACTED,
        "api_key": REDACTED,
        "x-apikey": REDACTED,
        "Authorization": REDACTED,
        "service_role": REDACTED,
        "attempt": 3,
    }


def test_nested_structures_are_redacted() -> None:
    """Strings and sensitive keys inside dicts, lists and tuples are redacted too."""
    event: dict[str, Any] = {
        "event": "request",
        "request": {
            "headers": {"authorization": "Bearer abc", "accept": "json"},
            "urls": ["https://u:pw@a.example", ("redis://:pw@b.example", 5)],
        },
    }
    assert redact_secrets(None, "info", event) == {
        "event": "request",
        "request": {
            "headers": {"authorization": REDACTED, "accept": "json"},
            "urls": ["https://u:***@a.example", ("redis://:***@b.example", 5)],
        },
    }


def test_objects_are_redacted_through_their_repr() -> None:
    """An exception whose repr shows a credential is replaced by its redacted repr."""
    error = ConnectionError("cannot reach postgresql://u:pw@db.example/x")
    assert redact_value(error) == "ConnectionError('cannot reach postgresql://u:***@db.example/x')"


def test_harmless_objects_are_kept() -> None:
    """Objects without secrets in their repr, and SecretStr, are left for the renderer."""
    secret = SecretStr("hunter2")
    error = ValueError("plain")
    assert redact_value(secret) is secret
    assert redact_value(error) is error


def test_known_secrets_are_replaced_anywhere() -> None:
    """secret_redactor also replaces given secrets, e.g. an API key in an RPC URL path."""
    redact = secret_redactor(["0123456789abcdef0123"])
    event = {"event": "HTTP 500 from https://rpc.example/v2/0123456789abcdef0123 (retrying)"}
    assert redact(None, "warning", event) == {
        "event": "HTTP 500 from https://rpc.example/v2/*** (retrying)"
    }


def test_secret_redactor_without_secrets_is_redact_secrets() -> None:
    """With no secrets to look for, the plain processor is used."""
    assert secret_redactor(["", ""]) is redact_secrets
