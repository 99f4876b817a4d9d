"""Events a :class:`~.connection.DtlsConnection` reports through ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass

from .constants import AlertDescription, AlertLevel, CipherSuite, NamedGroup, SrtpProfile


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """The handshake finished and the peer proved it holds the signalled certificate.

    SRTP material comes from the RFC 5705 exporter with label ``EXTRACTOR-dtls_srtp``
    (RFC 5764 4.2), already split into this side's (``local_*``, used to protect what we
    send) and the peer's (``remote_*``, used to unprotect what we receive). It is empty
    when no SRTP profile was negotiated.
    """

    cipher_suite: CipherSuite
    group: NamedGroup
    srtp_profile: SrtpProfile | None
    local_srtp_key: bytes
    local_srtp_salt: bytes
    remote_srtp_key: bytes
    remote_srtp_salt: bytes
    remote_fingerprint: tuple[str, str]
    remote_certificate: bytes
    extended_master_secret: bool
    handshake_time: float  # seconds from the first handshake flight to completion


@dataclass(frozen=True, slots=True)
class ApplicationData:
    data: bytes


@dataclass(frozen=True, slots=True)
class AlertReceived:
    level: AlertLevel | int
    description: AlertDescription | int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over; nothing more will be sent or received.

    ``alert`` is the alert that ended it (sent by us when ``by_peer`` is false), or
    ``None`` for a handshake that timed out.
    """

    reason: str
    alert: AlertDescription | int | None
    by_peer: bool


DtlsEvent = HandshakeCompleted | ApplicationData | AlertReceived | ConnectionClosed
