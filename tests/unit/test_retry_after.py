"""Reading a Retry-After header (RFC 9110 §10.2.3: delay-seconds or an HTTP date)."""

from __future__ import annotations

import email.utils
import time

import pytest

from indexer.rpc_wire import parse_retry_after


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("7", 7.0), (" 120 ", 120.0)])
def test_a_delay_in_seconds_is_read(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


def test_an_http_date_is_read_as_the_seconds_until_it() -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    waited = parse_retry_after(in_a_minute)
    assert waited is not None
    assert 55 <= waited <= 61


@pytest.mark.parametrize(
    "value",
    [
        *("inf", "nan", "-5", "1e3", "0x10", "\u0663", "soon", "", None),
        "Mon, 01 Jan 2020 00:00:99999999999999999999 GMT",  # parsed, then overflows
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
    ],
)
def test_what_is_neither_is_unusable(value: str | None) -> None:
    """Not a count of seconds nor a date: the caller's own backoff applies. (`float` took
    "nan", which waited 0 s, and "inf"; a date out of range raised OverflowError through
    the RPC client.)"""
    assert parse_retry_after(value) is None
