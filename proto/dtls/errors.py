"""Typed errors of the DTLS stack.

Every protocol failure carries the alert that RFC 5246 7.2.2 prescribes for it, so the
state machine can turn any error raised deep in a codec into the right fatal alert
without a table of special cases. Parsers raise only :class:`DtlsDecodeError` (or
another :class:`DtlsProtocolError`); they never let ``IndexError`` or ``struct.error``
escape.
"""

from __future__ import annotations

from .constants import AlertDescription


class DtlsError(Exception):
    """Base class of every error raised by ``voxrelay.proto.dtls``."""


class DtlsProtocolError(DtlsError):
    """The peer violated the protocol; the connection answers with a fatal ``alert``."""

    def __init__(self, alert: AlertDescription, message: str) -> None:
        super().__init__(message)
        self.alert = alert

    def __str__(self) -> str:
        return f"{self.alert.name.lower()}: {self.args[0]}"


class DtlsDecodeError(DtlsProtocolError):
    """Bytes that do not parse as the structure they claim to be (alert ``decode_error``)."""

    def __init__(self, message: str) -> None:
        super().__init__(AlertDescription.DECODE_ERROR, message)


class DtlsStateError(DtlsError):
    """The caller used the connection in a state that does not allow it."""
