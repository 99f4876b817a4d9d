"""PRF and key schedule, AEAD record protection, ECDHE, signatures, certificates,
fingerprints and HelloVerifyRequest cookies."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from voxrelay.proto.dtls import (
    AlertDescription,
    CipherSuite,
    HelloCookies,
    NamedGroup,
    certificate_fingerprint,
    generate_certificate,
    load_certificate,
)
from voxrelay.proto.dtls.certificate import load_peer_public_key, normalize_fingerprint
from voxrelay.proto.dtls.constants import SignatureScheme
from voxrelay.proto.dtls.crypto import (
    SUITES,
    EphemeralKey,
    RecordProtection,
    compute_master_secret,
    derive_traffic_keys,
    export_keying_material,
    prf,
    sign,
    verify_signature,
)
from voxrelay.proto.dtls.errors import DtlsProtocolError
from voxrelay.proto.dtls.handshake import ClientHello


def test_prf_sha256_known_answer():
    # The TLS 1.2 PRF test vector published for P_SHA256 (secret, seed, "test label").
    output = prf(
        "sha256",
        bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
        b"test label",
        bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"),
        100,
    )
    assert output == bytes.fromhex(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def test_prf_output_length_and_hash_are_honoured():
    assert len(prf("sha384", b"s", b"l", b"x", 77)) == 77
    assert prf("sha384", b"s", b"l", b"x", 48) != prf("sha256", b"s", b"l", b"x", 48)
    assert prf("sha256", b"s", b"l", b"x", 48)[:20] == prf("sha256", b"s", b"l", b"x", 20)


def test_extended_master_secret_depends_on_the_session_hash():
    suite = SUITES[CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    randoms = (bytes(32), bytes(range(32)))
    legacy = compute_master_secret(suite, b"premaster", *randoms, session_hash=None)
    extended = compute_master_secret(suite, b"premaster", *randoms, session_hash=bytes(32))
    other = compute_master_secret(suite, b"premaster", *randoms, session_hash=b"\x01" * 32)
    assert len({legacy, extended, other}) == 3 and all(len(s) == 48 for s in (legacy, extended))


def test_exporter_distinguishes_absent_and_empty_context():
    suite = SUITES[CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    args = (suite, bytes(48), bytes(32), bytes(32), b"EXTRACTOR-dtls_srtp", 60)
    assert export_keying_material(*args) != export_keying_material(*args, context=b"")
    assert export_keying_material(*args) == prf(
        "sha256", bytes(48), b"EXTRACTOR-dtls_srtp", bytes(64), 60
    )


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_key_block_sizes(suite):
    parameters = SUITES[suite]
    keys = derive_traffic_keys(parameters, bytes(48), bytes(32), bytes(32))
    assert len(keys.client_key) == len(keys.server_key) == parameters.key_length
    assert len(keys.client_iv) == len(keys.server_iv) == parameters.fixed_iv_length


@pytest.mark.parametrize("suite", list(CipherSuite))
@given(plaintext=st.binary(max_size=200), seq=st.integers(0, 2**48 - 1))
def test_record_protection_round_trip_and_tamper_detection(suite, plaintext, seq):
    parameters = SUITES[suite]
    keys = derive_traffic_keys(parameters, b"m" * 48, b"c" * 32, b"s" * 32)
    sender = RecordProtection(parameters, keys.client_key, keys.client_iv)
    receiver = RecordProtection(parameters, keys.client_key, keys.client_iv)
    sealed = sender.seal(23, 0xFEFD, 1, seq, plaintext)
    assert len(sealed) == len(plaintext) + parameters.record_overhead
    assert receiver.open(23, 0xFEFD, 1, seq, sealed) == plaintext
    # Header fields are authenticated: another type, epoch or sequence number fails.
    assert receiver.open(22, 0xFEFD, 1, seq, sealed) is None
    assert receiver.open(23, 0xFEFD, 2, seq, sealed) is None
    assert receiver.open(23, 0xFEFD, 1, seq ^ 1, sealed) is None
    assert receiver.open(23, 0xFEFD, 1, seq, sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert receiver.open(23, 0xFEFD, 1, seq, sealed[:10]) is None


def test_gcm_record_layout_follows_rfc_5288():
    parameters = SUITES[CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]
    key, salt = bytes(range(16)), b"SALT"
    sealed = RecordProtection(parameters, key, salt).seal(23, 0xFEFD, 1, 5, b"hello")
    explicit = (1).to_bytes(2, "big") + (5).to_bytes(6, "big")
    assert sealed[:8] == explicit
    additional = explicit + b"\x17\xfe\xfd\x00\x05"
    assert AESGCM(key).decrypt(salt + explicit, sealed[8:], additional) == b"hello"


@pytest.mark.parametrize("group", list(NamedGroup))
def test_ecdhe_agrees_and_rejects_invalid_points(group):
    ours, theirs = EphemeralKey(group), EphemeralKey(group)
    assert ours.exchange(theirs.public_bytes) == theirs.exchange(ours.public_bytes)
    bad = bytes(32) if group is NamedGroup.X25519 else b"\x04" + bytes(len(ours.public_bytes) - 1)
    with pytest.raises(DtlsProtocolError) as raised:
        ours.exchange(bad)
    assert raised.value.alert is AlertDescription.ILLEGAL_PARAMETER


def test_compressed_points_are_refused():
    key = EphemeralKey(NamedGroup.SECP256R1)
    with pytest.raises(DtlsProtocolError, match="only uncompressed points"):
        key.exchange(b"\x02" + bytes(32))


def test_signatures_verify_and_forgeries_are_decrypt_errors():
    private_key = ec.generate_private_key(ec.SECP256R1())
    scheme = SignatureScheme.ECDSA_SECP256R1_SHA256
    signature = sign(private_key, scheme, b"transcript")
    verify_signature(private_key.public_key(), scheme, b"transcript", signature)
    with pytest.raises(DtlsProtocolError) as raised:
        verify_signature(private_key.public_key(), scheme, b"tampered", signature)
    assert raised.value.alert is AlertDescription.DECRYPT_ERROR
    with pytest.raises(DtlsProtocolError, match="not supported"):
        verify_signature(private_key.public_key(), 0x0201, b"transcript", signature)


@pytest.mark.parametrize(
    "scheme", [SignatureScheme.RSA_PKCS1_SHA256, SignatureScheme.RSA_PSS_RSAE_SHA256]
)
def test_rsa_client_signatures_are_verified(scheme):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if scheme is SignatureScheme.RSA_PKCS1_SHA256:
        pad = padding.PKCS1v15()
    else:
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = key.sign(b"transcript", pad, hashes.SHA256())
    verify_signature(key.public_key(), scheme, b"transcript", signature)
    with pytest.raises(DtlsProtocolError, match="non-EC certificate"):
        verify_signature(key.public_key(), SignatureScheme.ECDSA_SECP256R1_SHA256, b"t", b"s")


# --- certificates and fingerprints --------------------------------------------------------


def test_generated_certificate_is_p256_self_signed_and_backdated():
    now = 1_700_000_000.0
    cert = generate_certificate(now, common_name="voxrelay")
    assert isinstance(cert.private_key.curve, ec.SECP256R1)
    x = cert.certificate
    assert x.issuer == x.subject
    assert x.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "voxrelay"
    issued = datetime.fromtimestamp(now, UTC)
    assert x.not_valid_before_utc == issued.replace(microsecond=0) - timedelta(days=1)
    assert x.not_valid_after_utc == issued.replace(microsecond=0) + timedelta(days=30)
    x.public_key().verify(x.signature, x.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_fingerprint_is_sdp_formatted_sha256_of_der():
    cert = generate_certificate(1.7e9)
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(cert.der).digest())
    assert cert.fingerprint() == certificate_fingerprint(cert.der) == expected
    assert len(cert.fingerprint("sha-1").split(":")) == 20
    with pytest.raises(ValueError, match="unknown fingerprint algorithm 'md5'"):
        certificate_fingerprint(cert.der, "md5")


def test_pem_round_trip():
    cert = generate_certificate(1.7e9)
    loaded = load_certificate(cert.certificate_pem(), cert.private_key_pem())
    assert loaded.der == cert.der and loaded.fingerprint() == cert.fingerprint()


def test_loading_a_mismatched_or_rsa_key_is_refused():
    one, two = generate_certificate(1.7e9), generate_certificate(1.7e9)
    with pytest.raises(ValueError, match="does not match"):
        load_certificate(one.certificate_pem(), two.private_key_pem())
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(TypeError, match="must use an ECDSA key"):
        load_certificate(one.certificate_pem(), rsa_pem)


def test_fingerprint_normalization():
    value = ":".join(["ab"] * 32)
    assert normalize_fingerprint(("SHA-256", value)) == ("sha-256", value.upper())
    with pytest.raises(ValueError, match="must be an \\(algorithm, value\\) pair"):
        normalize_fingerprint("sha-256")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 colon-separated hex bytes"):
        normalize_fingerprint(("sha-256", value[:-1] + "g"))


def test_peer_certificate_with_rsa_key_parses():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    now = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    public = load_peer_public_key(cert.public_bytes(serialization.Encoding.DER))
    assert isinstance(public, rsa.RSAPublicKey)
    with pytest.raises(ValueError):
        load_peer_public_key(b"not a certificate")
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    version_offset = der.index(bytes.fromhex("a003020102")) + 4  # [0] EXPLICIT INTEGER 2 (v3)
    der[version_offset] = 7
    with pytest.raises(ValueError, match="not a valid X509 version"):
        load_peer_public_key(bytes(der))


# --- cookies ------------------------------------------------------------------------------


def hello(cookie: bytes = b"", random: bytes = bytes(32)) -> ClientHello:
    return ClientHello(0xFEFD, random, cookie=cookie, cipher_suites=(0xC02B,))


def test_cookie_is_bound_to_address_parameters_and_time():
    cookies = HelloCookies(b"s" * 32, bucket_seconds=30)
    cookie = cookies.make(hello(), b"addr", now=100.0)
    assert cookies.verify(hello(cookie), b"addr", now=100.0)
    assert cookies.verify(hello(cookie), b"addr", now=125.0)  # next bucket still accepted
    assert not cookies.verify(hello(cookie), b"addr", now=150.0)  # two buckets later
    assert not cookies.verify(hello(cookie), b"other", now=100.0)
    assert not cookies.verify(hello(cookie, random=b"\x01" * 32), b"addr", now=100.0)
    assert not HelloCookies(b"t" * 32).verify(hello(cookie), b"addr", now=100.0)
    assert not cookies.verify(hello(cookie[:-1]), b"addr", now=100.0)


def test_cookie_secret_must_be_long_enough():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        HelloCookies(b"short")
