"""Cryptography of DTLS 1.2: PRF, key schedule, AEAD record protection, ECDHE, signatures.

Everything here is a thin layer over ``cryptography`` (and ``hmac`` for the PRF). The
formulas are RFC 5246 5 (PRF), 8.1 (master secret), 6.3 (key block) and 7.4.9
(Finished); RFC 7627 4 (extended master secret); RFC 5705 4 (exporters); RFC 5288 3 and
RFC 7905 2 (AEAD nonces); RFC 8422 (ECDHE and ECDSA).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .constants import AlertDescription, CipherSuite, NamedGroup, SignatureScheme
from .errors import DtlsProtocolError

MASTER_SECRET_SIZE = 48
VERIFY_DATA_SIZE = 12
AEAD_TAG_SIZE = 16


@dataclass(frozen=True, slots=True)
class SuiteParameters:
    """What the key schedule and record layer need to know about a cipher suite."""

    suite: CipherSuite
    prf_hash: str  # hashlib name of the PRF and transcript hash
    key_length: int
    fixed_iv_length: int  # implicit part of the nonce, from the key block
    explicit_nonce_length: int  # carried in each record (8 for GCM, 0 for ChaCha20)

    @property
    def record_overhead(self) -> int:
        return self.explicit_nonce_length + AEAD_TAG_SIZE

    def new_aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        if self.suite is CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256:
            return ChaCha20Poly1305(key)
        return AESGCM(key)


SUITES: dict[CipherSuite, SuiteParameters] = {
    CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: SuiteParameters(
        CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "sha256", 16, 4, 8
    ),
    CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384: SuiteParameters(
        CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, "sha384", 32, 4, 8
    ),
    CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: SuiteParameters(
        CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, "sha256", 32, 12, 0
    ),
}


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2 PRF: P_hash(secret, label + seed) truncated to ``length`` (RFC 5246 5)."""
    label_seed = label + seed
    output = bytearray()
    a = label_seed
    while len(output) < length:
        a = hmac.digest(secret, a, hash_name)
        output += hmac.digest(secret, a + label_seed, hash_name)
    return bytes(output[:length])


def transcript_hash(hash_name: str, transcript: bytes) -> bytes:
    return hashlib.new(hash_name, transcript).digest()


def compute_master_secret(
    suite: SuiteParameters,
    premaster_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    session_hash: bytes | None,
) -> bytes:
    """Master secret; with ``session_hash`` the extended one of RFC 7627 4."""
    if session_hash is not None:
        return prf(
            suite.prf_hash,
            premaster_secret,
            b"extended master secret",
            session_hash,
            MASTER_SECRET_SIZE,
        )
    return prf(
        suite.prf_hash,
        premaster_secret,
        b"master secret",
        client_random + server_random,
        MASTER_SECRET_SIZE,
    )


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes


def derive_traffic_keys(
    suite: SuiteParameters, master_secret: bytes, client_random: bytes, server_random: bytes
) -> TrafficKeys:
    """Split the key block (RFC 5246 6.3); AEAD suites have no MAC keys."""
    key, iv = suite.key_length, suite.fixed_iv_length
    block = prf(
        suite.prf_hash,
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * (key + iv),
    )
    return TrafficKeys(
        client_key=block[:key],
        server_key=block[key : 2 * key],
        client_iv=block[2 * key : 2 * key + iv],
        server_iv=block[2 * key + iv :],
    )


def finished_verify_data(
    suite: SuiteParameters, master_secret: bytes, label: bytes, handshake_hash: bytes
) -> bytes:
    return prf(suite.prf_hash, master_secret, label, handshake_hash, VERIFY_DATA_SIZE)


def export_keying_material(
    suite: SuiteParameters,
    master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    label: bytes,
    length: int,
    context: bytes | None = None,
) -> bytes:
    """RFC 5705 4 exporter; ``context=None`` and ``b""`` differ, as the RFC requires."""
    seed = client_random + server_random
    if context is not None:
        if len(context) >= 1 << 16:
            raise ValueError("exporter context must be shorter than 65536 bytes")
        seed += len(context).to_bytes(2, "big") + context
    return prf(suite.prf_hash, master_secret, label, seed, length)


class RecordProtection:
    """AEAD protection of one direction of one epoch.

    GCM (RFC 5288 3): nonce = 4-byte implicit salt || 8-byte explicit nonce, and the
    explicit part (we use epoch || sequence number, unique per key) prefixes the
    ciphertext. ChaCha20-Poly1305 (RFC 7905 2): nonce = 12-byte IV XOR the left-padded
    64-bit epoch || sequence number, nothing explicit. The additional data is
    epoch || seq || type || version || plaintext length (RFC 6347 4.1.2.1).
    """

    __slots__ = ("_aead", "_iv", "_iv_int", "suite")

    def __init__(self, suite: SuiteParameters, key: bytes, iv: bytes) -> None:
        self.suite = suite
        self._aead = suite.new_aead(key)
        self._iv = iv
        self._iv_int = int.from_bytes(iv, "big")

    def _nonce(self, record_number: bytes) -> bytes:
        if self.suite.explicit_nonce_length:
            return self._iv + record_number
        return (self._iv_int ^ int.from_bytes(record_number, "big")).to_bytes(12, "big")

    def seal(
        self, content_type: int, version: int, epoch: int, sequence_number: int, plaintext: bytes
    ) -> bytes:
        record_number = epoch.to_bytes(2, "big") + sequence_number.to_bytes(6, "big")
        aad = _additional_data(record_number, content_type, version, len(plaintext))
        sealed = self._aead.encrypt(self._nonce(record_number), plaintext, aad)
        if self.suite.explicit_nonce_length:
            return record_number + sealed
        return sealed

    def open(
        self, content_type: int, version: int, epoch: int, sequence_number: int, fragment: bytes
    ) -> bytes | None:
        """The plaintext, or ``None`` when the record does not authenticate."""
        explicit = self.suite.explicit_nonce_length
        plaintext_length = len(fragment) - explicit - AEAD_TAG_SIZE
        if plaintext_length < 0:
            return None
        record_number = epoch.to_bytes(2, "big") + sequence_number.to_bytes(6, "big")
        nonce = self._iv + fragment[:explicit] if explicit else self._nonce(record_number)
        aad = _additional_data(record_number, content_type, version, plaintext_length)
        try:
            return self._aead.decrypt(nonce, fragment[explicit:], aad)
        except InvalidTag:
            return None


def _additional_data(record_number: bytes, content_type: int, version: int, length: int) -> bytes:
    # Unlike the record header, the sequence number comes first here (RFC 5246 6.2.3.3).
    return (
        record_number
        + bytes((content_type,))
        + version.to_bytes(2, "big")
        + length.to_bytes(2, "big")
    )


# --- ECDHE ------------------------------------------------------------------------------

_EC_CURVES: dict[NamedGroup, type[ec.EllipticCurve]] = {
    NamedGroup.SECP256R1: ec.SECP256R1,
    NamedGroup.SECP384R1: ec.SECP384R1,
}


class EphemeralKey:
    """One side's ECDHE key pair for a single handshake."""

    def __init__(self, group: NamedGroup) -> None:
        self.group = group
        if group is NamedGroup.X25519:
            self._x25519 = x25519.X25519PrivateKey.generate()
            self.public_bytes = self._x25519.public_key().public_bytes_raw()
        else:
            self._ec = ec.generate_private_key(_EC_CURVES[group]())
            self.public_bytes = self._ec.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint
            )

    def exchange(self, peer_public: bytes) -> bytes:
        """The premaster secret; an invalid peer point is an ``illegal_parameter``."""
        try:
            if self.group is NamedGroup.X25519:
                if len(peer_public) != 32:
                    raise ValueError("x25519 public value must be 32 bytes")
                peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
                return self._x25519.exchange(peer)
            if not peer_public or peer_public[0] != 4:
                raise ValueError("only uncompressed points are allowed (RFC 8422 5.1.2)")
            curve = _EC_CURVES[self.group]()
            peer_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve, peer_public)
            return self._ec.exchange(ec.ECDH(), peer_ec)
        except ValueError as error:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"peer's {self.group.name.lower()} public value is invalid: {error}",
            ) from None


# --- signatures -------------------------------------------------------------------------

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey

_SCHEME_HASHES: dict[SignatureScheme, type[hashes.HashAlgorithm]] = {
    SignatureScheme.ECDSA_SECP256R1_SHA256: hashes.SHA256,
    SignatureScheme.ECDSA_SECP384R1_SHA384: hashes.SHA384,
    SignatureScheme.ECDSA_SECP521R1_SHA512: hashes.SHA512,
    SignatureScheme.RSA_PKCS1_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PKCS1_SHA384: hashes.SHA384,
    SignatureScheme.RSA_PKCS1_SHA512: hashes.SHA512,
    SignatureScheme.RSA_PSS_RSAE_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PSS_RSAE_SHA384: hashes.SHA384,
    SignatureScheme.RSA_PSS_RSAE_SHA512: hashes.SHA512,
}

ECDSA_SCHEMES = frozenset(
    {
        SignatureScheme.ECDSA_SECP256R1_SHA256,
        SignatureScheme.ECDSA_SECP384R1_SHA384,
        SignatureScheme.ECDSA_SECP521R1_SHA512,
    }
)

# What we accept from peers, most preferred first (advertised in CertificateRequest and
# ClientHello). RSA is accepted for client certificates only: some WebRTC stacks still
# generate RSA certificates.
VERIFIABLE_SCHEMES: tuple[SignatureScheme, ...] = (
    SignatureScheme.ECDSA_SECP256R1_SHA256,
    SignatureScheme.RSA_PSS_RSAE_SHA256,
    SignatureScheme.RSA_PKCS1_SHA256,
    SignatureScheme.ECDSA_SECP384R1_SHA384,
    SignatureScheme.RSA_PSS_RSAE_SHA384,
    SignatureScheme.RSA_PKCS1_SHA384,
    SignatureScheme.ECDSA_SECP521R1_SHA512,
    SignatureScheme.RSA_PSS_RSAE_SHA512,
    SignatureScheme.RSA_PKCS1_SHA512,
)


def signing_schemes_for(private_key: PrivateKey) -> tuple[SignatureScheme, ...]:
    """Schemes our key can sign with, best first (curve-matched hash first)."""
    preferred = {
        "secp256r1": SignatureScheme.ECDSA_SECP256R1_SHA256,
        "secp384r1": SignatureScheme.ECDSA_SECP384R1_SHA384,
        "secp521r1": SignatureScheme.ECDSA_SECP521R1_SHA512,
    }.get(private_key.curve.name)
    others = tuple(s for s in sorted(ECDSA_SCHEMES) if s != preferred)
    return ((preferred,) if preferred else ()) + others


def sign(private_key: PrivateKey, scheme: SignatureScheme, data: bytes) -> bytes:
    return private_key.sign(data, ec.ECDSA(_SCHEME_HASHES[scheme]()))


def verify_signature(public_key: object, scheme: int, data: bytes, signature: bytes) -> None:
    """Raise ``decrypt_error`` (RFC 5246 7.4.8) unless ``signature`` is valid."""
    try:
        scheme = SignatureScheme(scheme)
        hash_algorithm = _SCHEME_HASHES[scheme]()
    except (ValueError, KeyError):
        raise DtlsProtocolError(
            AlertDescription.ILLEGAL_PARAMETER, f"signature scheme 0x{scheme:04x} not supported"
        ) from None
    try:
        if scheme in ECDSA_SCHEMES:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise DtlsProtocolError(
                    AlertDescription.ILLEGAL_PARAMETER,
                    f"{scheme.name.lower()} signature from a non-EC certificate",
                )
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        else:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise DtlsProtocolError(
                    AlertDescription.ILLEGAL_PARAMETER,
                    f"{scheme.name.lower()} signature from a non-RSA certificate",
                )
            if scheme.name.startswith("RSA_PSS"):
                pad: padding.AsymmetricPadding = padding.PSS(
                    mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size
                )
            else:
                pad = padding.PKCS1v15()
            public_key.verify(signature, data, pad, hash_algorithm)
    except InvalidSignature:
        raise DtlsProtocolError(
            AlertDescription.DECRYPT_ERROR, f"{scheme.name.lower()} signature does not verify"
        ) from None
