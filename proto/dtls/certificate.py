"""Self-signed ECDSA certificates for DTLS-SRTP and their SDP fingerprints (RFC 8122).

WebRTC authenticates a DTLS peer by the hash of its certificate signalled in SDP, not by
a chain to a CA; so a certificate here is just a carrier for a P-256 public key, and the
fingerprint is the only identity that matters. Generation takes the time as an argument
(this package never reads a clock).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# RFC 8122 5: the hash function textual names, mapped to hashlib names.
FINGERPRINT_ALGORITHMS: dict[str, str] = {
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}

Fingerprint = tuple[str, str]  # ("sha-256", "AB:CD:...")


def certificate_fingerprint(der: bytes, algorithm: str = "sha-256") -> str:
    """``AB:CD:...`` upper-case hex of the hash of a DER certificate, as in SDP."""
    hash_name = FINGERPRINT_ALGORITHMS.get(algorithm.lower())
    if hash_name is None:
        raise ValueError(
            f"unknown fingerprint algorithm {algorithm!r}; use one of "
            f"{', '.join(FINGERPRINT_ALGORITHMS)}"
        )
    return ":".join(f"{byte:02X}" for byte in hashlib.new(hash_name, der).digest())


def normalize_fingerprint(fingerprint: Fingerprint) -> Fingerprint:
    """Validate an SDP fingerprint and put it in canonical form (lower-case algorithm,
    upper-case hex); raise ``ValueError`` with the reason otherwise."""
    try:
        algorithm, value = fingerprint
    except (TypeError, ValueError):
        raise ValueError(
            f"fingerprint must be an (algorithm, value) pair, got {fingerprint!r}"
        ) from None
    algorithm = str(algorithm).lower()
    hash_name = FINGERPRINT_ALGORITHMS.get(algorithm)
    if hash_name is None:
        raise ValueError(f"unknown fingerprint algorithm {algorithm!r}")
    digest_size = hashlib.new(hash_name).digest_size
    parts = str(value).split(":")
    if len(parts) != digest_size or any(
        len(part) != 2 or not all(c in "0123456789abcdefABCDEF" for c in part) for part in parts
    ):
        raise ValueError(
            f"{algorithm} fingerprint must be {digest_size} colon-separated hex bytes, "
            f"got {value!r}"
        )
    return algorithm, str(value).upper()


def fingerprint_matches(der: bytes, expected: Iterable[Fingerprint]) -> Fingerprint | None:
    """The first expected fingerprint that ``der`` matches, or ``None``."""
    for algorithm, value in expected:
        actual = certificate_fingerprint(der, algorithm)
        if hmac.compare_digest(actual, value.upper()):
            return algorithm, actual
    return None


@dataclass(frozen=True)
class DtlsCertificate:
    """A certificate with its private key, and its DER bytes ready for the wire."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    der: bytes = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            raise TypeError("DTLS certificates must use an ECDSA key (ECDHE_ECDSA suites)")
        public = self.certificate.public_key()
        key_public = self.private_key.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != (
            key_public.public_numbers()
        ):
            raise ValueError("private key does not match the certificate's public key")
        object.__setattr__(self, "der", self.certificate.public_bytes(serialization.Encoding.DER))

    def fingerprint(self, algorithm: str = "sha-256") -> str:
        return certificate_fingerprint(self.der, algorithm)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def generate_certificate(
    now: float,
    common_name: str | None = None,
    lifetime: timedelta = timedelta(days=30),
    curve: ec.EllipticCurve | None = None,
) -> DtlsCertificate:
    """A fresh self-signed certificate valid from a day before ``now`` (unix seconds).

    The one-day back-dating tolerates peers whose clocks lag, as browsers do for theirs.
    """
    private_key = ec.generate_private_key(curve or ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or os.urandom(8).hex())])
    issued = datetime.fromtimestamp(now, UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - timedelta(days=1))
        .not_valid_after(issued + lifetime)
        .sign(private_key, hashes.SHA256())
    )
    return DtlsCertificate(certificate, private_key)


def load_certificate(
    certificate_pem: bytes, private_key_pem: bytes, password: bytes | None = None
) -> DtlsCertificate:
    """Load a PEM certificate and its PEM private key (which must be ECDSA)."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    private_key = serialization.load_pem_private_key(private_key_pem, password)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError(
            f"DTLS certificates must use an ECDSA key, got {type(private_key).__name__}"
        )
    return DtlsCertificate(certificate, private_key)


def load_peer_public_key(der: bytes) -> object:
    """The public key of a peer's certificate; ``ValueError`` if it does not parse.

    ``cryptography`` reports bad certificates with several exception types (an unknown
    X.509 version, an unsupported key algorithm); callers get one.
    """
    try:
        return x509.load_der_x509_certificate(der).public_key()
    except (x509.InvalidVersion, UnsupportedAlgorithm) as error:
        raise ValueError(str(error) or type(error).__name__) from None
