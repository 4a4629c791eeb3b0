"""TLS: the certificate an endpoint serves, verified as a browser would, and when it expires."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from ops.errors import CertificateInvalid, ProbeError

__all__ = ["Certificate", "fetch_certificate", "tls_context"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """The parts of a served certificate an operator needs."""

    not_after: datetime
    issuer: str

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context; ca_file replaces the system's CA store when given."""
    return ssl.create_default_context(cafile=ca_file or None)


async def fetch_certificate(host: str, port: int, *, ca_file: str, within: float) -> Certificate:
    """Complete a TLS handshake with host:port (SNI host) and return the verified certificate.

    CertificateInvalid when it does not verify (expired, self-signed, wrong name), ProbeError
    when nothing answers.
    """
    try:
        context = tls_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"cannot load OPS_TLS_CA_FILE {ca_file}: {exc}") from None
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host, ssl_handshake_timeout=within
            )
    except TimeoutError:
        raise ProbeError(f"no TLS handshake with {host}:{port} within {within:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise CertificateInvalid(
            f"certificate of {host}:{port} does not verify: {exc.verify_message}"
        ) from None
    except socket.gaierror as exc:  # before OSError, which it is
        raise ProbeError(
            f"cannot look up {host}: {exc.strerror or exc}",
            fix=f"check the DNS record of {host} (dig +short {host}), or OPS_TLS_ENDPOINT",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(
            f"cannot connect to {host}:{port}: {exc.strerror or exc}",
            fix=f"sudo systemctl status nginx; sudo ufw status ({port} must be allowed)",
        ) from None
    try:
        peer = writer.get_extra_info("peercert")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(within):
                await writer.wait_closed()
    if not peer or "notAfter" not in peer:
        raise ProbeError(f"{host}:{port} sent no certificate")
    not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(peer["notAfter"]), tz=UTC)
    issuer = ", ".join(f"{k}={v}" for rdn in peer.get("issuer", ()) for k, v in rdn)
    return Certificate(not_after, issuer)
