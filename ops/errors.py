"""Exceptions of the operations tools, rooted at the project's KektechError."""

from __future__ import annotations

from shared.errors import KektechError

__all__ = ["CertificateInvalid", "OpsError", "ProbeError", "StateError"]


class OpsError(KektechError):
    """Root of every error the operations tools raise."""


class ProbeError(OpsError):
    """A probe got no usable answer; `detail` says what happened, `fix` what to do, if known."""

    detail: str
    fix: str | None

    def __init__(self, detail: str, *, fix: str | None = None) -> None:
        self.detail = detail
        self.fix = fix
        super().__init__(detail)

    def __str__(self) -> str:
        return self.detail


class CertificateInvalid(ProbeError):  # noqa: N818 - names what was found, like ProbeError
    """The endpoint answered with a certificate that does not verify (expired, wrong name...)."""


class StateError(OpsError):
    """The monitor's state file cannot be read or written."""
