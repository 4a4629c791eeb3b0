"""Value types and parsers for settings read from the environment; pure, no I/O."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr

from shared.evm import checked_address

__all__ = [
    "Address",
    "Host",
    "HttpUrlSecret",
    "HttpsUrl",
    "IpNetwork",
    "OptionalAddress",
    "OptionalHttpsUrl",
    "OptionalSecret",
    "Origin",
    "Port",
    "PostgresUrlSecret",
    "RedisUrlSecret",
    "public_host",
    "split_csv",
    "url_host",
    "url_secret_fragments",
]

# Shorter strings would redact ordinary words everywhere in the logs; URL-shaped credentials
# are still caught by pattern (shared.redaction), whatever their length.
MIN_SECRET_FRAGMENT = 8
# A browser's Origin leaves out the port when it is the scheme's default (RFC 6454).
DEFAULT_PORTS = {"http": 80, "https": 443}
# Provider keys are 32+ characters; ordinary path segments ("rpc", "v2") are far shorter.
# Shorter segments count as keys when they mix letters and digits (see _looks_like_a_key).
MIN_API_KEY = 16


def split_csv(value: object) -> object:
    """Split a comma-separated string into its non-blank, stripped items; pass other values on."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def empty_to_none(value: object) -> object:
    """Treat an empty or blank string as unset, since `VAR=` in a .env file means "no value"."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


def check_url(url: str, schemes: frozenset[str], *, need_host: bool = True) -> str:
    """Return url if its scheme is one of schemes (and it names a host); raise ValueError."""
    # Messages never quote the URL: it may carry a password or an API key.
    try:
        parts = urlsplit(url)
        _ = parts.port  # parsed now so that a bad port is reported here, not at connect time
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme.lower() not in schemes:
        *others, last = sorted(schemes)
        expected = f"{', '.join(others)} or {last}" if others else last
        raise ValueError(f"URL scheme must be {expected}")
    if parts.netloc.count("@") > 1:
        # urlsplit takes the last @ as the end of the credentials, asyncpg the first: the
        # same URL would name another host there. RFC 3986 allows no raw @ in them anyway.
        raise ValueError("more than one @ before the host: percent-encode @ in the password as %40")
    if need_host and not parts.hostname:
        raise ValueError("URL has no host")
    if parts.scheme.lower() in {"http", "https"} and not _basic_auth_sendable(parts):
        # aiohttp sends the credentials of an http(s) URL as HTTP Basic authentication, in
        # Latin-1: anything else raised UnicodeEncodeError at the first request.
        raise ValueError(
            "the user name or password has characters HTTP Basic authentication cannot send"
            " (Latin-1 only, percent-encoded or not)"
        )
    if parts.hostname:
        check_host(parts.hostname)
    return url


def _basic_auth_sendable(parts: SplitResult) -> bool:
    """Whether the credentials of a URL, percent-decoded as aiohttp decodes them, are
    Latin-1 (none are)."""
    for part in (parts.username or "", parts.password or ""):
        try:
            decoded = unquote(part, errors="strict")
        except UnicodeDecodeError:
            decoded = part  # not UTF-8 once decoded: aiohttp (yarl) leaves it encoded, ASCII
        try:
            decoded.encode("latin-1")
        except UnicodeEncodeError:
            return False
    return True


def check_host(host: str) -> str:
    """Return host if it can be looked up (no empty or over-long label); raise ValueError."""
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("not a valid host name (an empty or over-long label?)") from None
    return host


def _secret_url(schemes: frozenset[str], *, need_host: bool = True) -> AfterValidator:
    """Build a validator that checks the scheme of a SecretStr URL without revealing it."""

    def validate(url: SecretStr) -> SecretStr:
        check_url(url.get_secret_value(), schemes, need_host=need_host)
        return url

    return AfterValidator(validate)


def _check_redis_url(url: SecretStr) -> SecretStr:
    """Check a Redis URL: redis:// and rediss:// name a host, unix:// names a socket path."""
    plain = url.get_secret_value()
    check_url(plain, frozenset({"redis", "rediss", "unix"}), need_host=False)
    parts = urlsplit(plain)
    if parts.scheme.lower() == "unix":
        if not parts.path:
            raise ValueError("unix:// URL has no socket path")
    elif not parts.hostname:
        raise ValueError("URL has no host")
    return url


def _check_https_url(url: str) -> str:
    """Check a plain (non-secret) https URL."""
    return check_url(url, frozenset({"https"}))


def _check_origin(origin: str) -> str:
    """Normalize a browser Origin (scheme://host[:port]) to the form browsers send: lowercase,
    without the scheme's default port (https://kektech.xyz:443 is sent as https://kektech.xyz)."""
    check_url(origin, frozenset({"http", "https"}))
    parts = urlsplit(origin)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError("an origin is scheme://host[:port] with no path, query or credentials")
    scheme, host = parts.scheme.lower(), url_host(parts.hostname or "")  # hostname: lowercase
    port = "" if parts.port in (None, DEFAULT_PORTS[scheme]) else f":{parts.port}"
    return f"{scheme}://{host}{port}"


# A host name as RFC 1123 has them: dot-separated labels of letters, digits and inner hyphens.
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host_setting(value: str) -> str:
    """A host to listen on or connect to: an IP address (IPv6 without brackets, as bind and
    connect take it) or a host name; the blanks around it dropped."""
    host = value.strip()
    if _is_ip_address(host):
        return host
    labels = host.removesuffix(".").split(".")
    # An all-digit last label (127.0.0.256, 10.0.0) is no name (RFC 3696 §2): a mistyped
    # address, which only the bind would refuse.
    if (
        len(host) <= 253
        and all(HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    ):
        return host
    raise ValueError(
        "must be an IP address (such as 127.0.0.1 or ::1) or a host name, with no port or brackets"
    )


def _parse_network(value: object) -> object:
    """Parse an IP address or CIDR block; a bare address becomes a one-address network."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=True)
        except ValueError:
            raise ValueError("expected an IP address or CIDR block such as 10.0.0.0/8") from None
    return value


def url_secret_fragments(url: str) -> list[str]:
    """Return the URL itself and its parts that are secret by themselves: the password, every
    query value, and the path segments and host name labels that look like API keys."""
    # RPC providers embed API keys in the path (/v2/<key>) or query (?apikey=<key>), and
    # libraries (and providers' error messages) quote URLs in their own spelling, so the parts
    # are redacted as well as the whole URL. Only http(s) paths are searched: a database path
    # is just its (unsecret) name.
    try:
        parts = urlsplit(url)
        candidates = [url, parts.password or ""]
    except ValueError:
        return [url]
    if parts.scheme.lower() in ("http", "https"):
        candidates += [p.partition("=")[2] for p in parts.query.split("&")]
        candidates += [token for token in parts.path.split("/") if _looks_like_a_key(token)]
        candidates += [label for label in _host_labels(parts.hostname) if _is_host_key(label)]
    return [c for c in candidates if len(c) >= MIN_SECRET_FRAGMENT]


def public_host(url: str) -> str:
    """Return the host[:port] of an http(s) URL fit for logs: labels that look like API keys
    (some providers issue "<key>.rpc.example") become "***", IP addresses are kept whole."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _is_ip_address(host):
        shown = url_host(host)
    else:
        shown = ".".join("***" if _is_host_key(label) else label for label in host.split("."))
    return f"{shown}:{parts.port}" if parts.port else shown


def url_host(host: str) -> str:
    """Return host as a URL spells it: an IPv6 literal in brackets ("[::1]"), so that its
    colons are not taken for the port's; any other host (or one bracketed already) as given."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_host_key(label: str) -> bool:
    """A host name label that is an API key: key-like and unhyphenated. Providers' own labels
    join words with hyphens ("arbitrum-mainnet", "bsc-dataseed1"); keys are one run of
    letters and digits."""
    return "-" not in label and _looks_like_a_key(label)


def _host_labels(host: str | None) -> list[str]:
    """The dot-separated labels of a host name; none for an IP address."""
    return [] if not host or _is_ip_address(host) else host.split(".")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _looks_like_a_key(token: str) -> bool:
    """A path segment that is an API key rather than a route ("v2", "mainnet", "rpc")."""
    if len(token) >= MIN_API_KEY:
        return True
    has_digit = any(c.isdigit() for c in token)
    return len(token) >= MIN_SECRET_FRAGMENT and has_digit and any(c.isalpha() for c in token)


Port = Annotated[int, Field(ge=1, le=65535)]
Host = Annotated[str, AfterValidator(_check_host_setting)]
Address = Annotated[str, AfterValidator(checked_address)]
OptionalAddress = Annotated[Address | None, BeforeValidator(empty_to_none)]
HttpUrlSecret = Annotated[SecretStr, _secret_url(frozenset({"http", "https"}))]
PostgresUrlSecret = Annotated[
    SecretStr, _secret_url(frozenset({"postgres", "postgresql"}), need_host=False)
]
RedisUrlSecret = Annotated[SecretStr, AfterValidator(_check_redis_url)]
HttpsUrl = Annotated[str, AfterValidator(_check_https_url)]
OptionalHttpsUrl = Annotated[HttpsUrl | None, BeforeValidator(empty_to_none)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(empty_to_none)]
Origin = Annotated[str, AfterValidator(_check_origin)]
IpNetwork = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_parse_network)
]
