"""Sans-IO DTLS 1.2 for DTLS-SRTP (RFC 6347, RFC 5764), client and server roles.

``DtlsConnection`` is driven with bytes and ``now`` and answers with datagrams, a timer
and events; see :mod:`.connection`. Everything a caller needs is re-exported here.
"""

from .certificate import (
    DtlsCertificate,
    Fingerprint,
    certificate_fingerprint,
    generate_certificate,
    load_certificate,
)
from .connection import (
    CLIENT,
    DEFAULT_CIPHER_SUITES,
    DEFAULT_GROUPS,
    DEFAULT_SRTP_PROFILES,
    SERVER,
    DtlsConfiguration,
    DtlsConnection,
    DtlsRole,
)
from .constants import (
    AlertDescription,
    AlertLevel,
    CipherSuite,
    NamedGroup,
    SrtpProfile,
)
from .cookie import HelloCookies
from .errors import DtlsDecodeError, DtlsError, DtlsProtocolError, DtlsStateError
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    DtlsEvent,
    HandshakeCompleted,
)

__all__ = [
    "CLIENT",
    "DEFAULT_CIPHER_SUITES",
    "DEFAULT_GROUPS",
    "DEFAULT_SRTP_PROFILES",
    "SERVER",
    "AlertDescription",
    "AlertLevel",
    "AlertReceived",
    "ApplicationData",
    "CipherSuite",
    "ConnectionClosed",
    "DtlsCertificate",
    "DtlsConfiguration",
    "DtlsConnection",
    "DtlsDecodeError",
    "DtlsError",
    "DtlsEvent",
    "DtlsProtocolError",
    "DtlsRole",
    "DtlsStateError",
    "Fingerprint",
    "HandshakeCompleted",
    "HelloCookies",
    "NamedGroup",
    "SrtpProfile",
    "certificate_fingerprint",
    "generate_certificate",
    "load_certificate",
]
