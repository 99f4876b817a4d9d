"""Wire code points of DTLS 1.2 and its extensions, as IANA registers them.

Kept in one module so codecs, crypto and the state machine agree on names, and so an
unknown value from a peer stays a plain ``int`` instead of failing an enum lookup.
"""

from __future__ import annotations

from enum import IntEnum

DTLS_1_0 = 0xFEFF
DTLS_1_2 = 0xFEFD


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(IntEnum):
    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    HELLO_VERIFY_REQUEST = 3
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16
    FINISHED = 20


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100
    UNSUPPORTED_EXTENSION = 110


class ExtensionType(IntEnum):
    SUPPORTED_GROUPS = 10
    EC_POINT_FORMATS = 11
    SIGNATURE_ALGORITHMS = 13
    USE_SRTP = 14
    EXTENDED_MASTER_SECRET = 23
    SUPPORTED_VERSIONS = 43
    KEY_SHARE = 51
    RENEGOTIATION_INFO = 0xFF01


class CipherSuite(IntEnum):
    ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 = 0xC02B
    ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 = 0xC02C
    ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA9


# RFC 5746 3.3: a client may signal secure renegotiation with this pseudo-suite instead
# of an empty renegotiation_info extension.
EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF


class NamedGroup(IntEnum):
    SECP256R1 = 23
    SECP384R1 = 24
    X25519 = 29


class SignatureScheme(IntEnum):
    RSA_PKCS1_SHA256 = 0x0401
    RSA_PKCS1_SHA384 = 0x0501
    RSA_PKCS1_SHA512 = 0x0601
    ECDSA_SECP256R1_SHA256 = 0x0403
    ECDSA_SECP384R1_SHA384 = 0x0503
    ECDSA_SECP521R1_SHA512 = 0x0603
    RSA_PSS_RSAE_SHA256 = 0x0804
    RSA_PSS_RSAE_SHA384 = 0x0805
    RSA_PSS_RSAE_SHA512 = 0x0806


class ClientCertificateType(IntEnum):
    RSA_SIGN = 1
    ECDSA_SIGN = 64


class SrtpProfile(IntEnum):
    """DTLS-SRTP protection profiles (RFC 5764 4.1.2, RFC 7714 14.2)."""

    AES128_CM_HMAC_SHA1_80 = 0x0001
    AES128_CM_HMAC_SHA1_32 = 0x0002
    AEAD_AES_128_GCM = 0x0007
    AEAD_AES_256_GCM = 0x0008

    @property
    def key_length(self) -> int:
        return 32 if self is SrtpProfile.AEAD_AES_256_GCM else 16

    @property
    def salt_length(self) -> int:
        if self in (SrtpProfile.AEAD_AES_128_GCM, SrtpProfile.AEAD_AES_256_GCM):
            return 12
        return 14


EC_POINT_FORMAT_UNCOMPRESSED = 0
EC_CURVE_TYPE_NAMED_CURVE = 3
COMPRESSION_NULL = 0

EXPORTER_LABEL_DTLS_SRTP = b"EXTRACTOR-dtls_srtp"


def describe(enum_type: type[IntEnum], value: int) -> str:
    """Name a code point for a message, falling back to hex for values we do not know."""
    try:
        return enum_type(value).name.lower()
    except ValueError:
        return f"0x{value:04x}"
