"""Routing tokens (docs/internals.md, "Routing token in the server ufrag"): the exact
layout, ICE-ufrag-only characters, rotation between two secrets, and rejection of every
malformed, forged, stale or foreign token with its own TokenError subclass."""

import base64
import hashlib
import hmac
import os
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.token import (
    TOKEN_LENGTH,
    BadTokenMacError,
    MalformedTokenError,
    RouteClaim,
    TokenError,
    TokenVerifier,
    UnknownTokenKeyError,
    UnsupportedTokenVersionError,
    WrongClusterError,
    key_id_for,
    mint_token,
)

CLUSTER = 42
ICE_UFRAG = re.compile(r"[A-Za-z0-9+/]{24}")  # RFC 8839 ice-char, and our fixed length


def secret_with_key_id(key_id: int, label: str) -> bytes:
    """A deterministic 32-byte secret whose key id is ``key_id``."""
    for counter in range(10_000):
        secret = hashlib.sha256(f"{label}/{counter}".encode()).digest()
        if key_id_for(secret) == key_id:
            return secret
    raise AssertionError("unreachable: 1 in 16 secrets has each key id")


CURRENT = secret_with_key_id(3, "current")
PREVIOUS = secret_with_key_id(11, "previous")
FOREIGN_SAME_KEY_ID = secret_with_key_id(3, "foreign")  # same key id as CURRENT, other key


def signed_token(secret: bytes, first_byte: int, cluster: int, transceiver: int) -> str:
    """Build a token by hand with a valid MAC, for fields mint_token refuses to produce."""
    signed = struct.pack("!BHH", first_byte, cluster, transceiver) + b"nonce"
    mac = hmac.new(secret, signed, hashlib.sha256).digest()[:8]
    return base64.b64encode(signed + mac).decode()


def flip_bit(token: str, bit: int) -> str:
    """Flip one bit of the 18 bytes a token encodes, and re-encode."""
    raw = bytearray(base64.b64decode(token))
    raw[bit // 8] ^= 0x80 >> (bit % 8)
    return base64.b64encode(raw).decode()


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier([CURRENT], CLUSTER)


# Minting and the layout


def test_token_layout_matches_the_contract() -> None:
    token = mint_token(CURRENT, 0x1234, 0xBEEF, nonce=b"\x01\x02\x03\x04\x05")
    raw = base64.b64decode(token, validate=True)
    assert len(token) == TOKEN_LENGTH == 24
    assert "=" not in token
    assert raw[0] == 0x10 | key_id_for(CURRENT)
    assert raw[1:3] == b"\x12\x34"
    assert raw[3:5] == b"\xbe\xef"
    assert raw[5:10] == b"\x01\x02\x03\x04\x05"
    assert raw[10:] == hmac.new(CURRENT, raw[:10], hashlib.sha256).digest()[:8]


def test_minting_is_deterministic_given_the_nonce() -> None:
    assert mint_token(CURRENT, 1, 2, nonce=b"abcde") == mint_token(CURRENT, 1, 2, nonce=b"abcde")


def test_default_nonces_are_random() -> None:
    tokens = {mint_token(CURRENT, CLUSTER, 1) for _ in range(100)}
    assert len(tokens) == 100


def test_key_id_is_the_first_nibble_of_a_labelled_hash_of_the_secret() -> None:
    for secret in (CURRENT, PREVIOUS, b"\x00" * 16, os.urandom(64)):
        expected = hashlib.sha256(b"voxrelay key id" + secret).digest()[0] >> 4
        assert key_id_for(secret) == expected
    assert key_id_for(CURRENT) == 3
    assert key_id_for(PREVIOUS) == 11


@pytest.mark.parametrize("length", [0, 1, 15])
def test_secrets_shorter_than_16_bytes_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        key_id_for(b"s" * length)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        mint_token(b"s" * length, CLUSTER, 1)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TokenVerifier([b"s" * length], CLUSTER)


def test_a_text_secret_is_refused() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        key_id_for("0123456789abcdef0123")  # type: ignore[arg-type]


@pytest.mark.parametrize("cluster", [-1, 65536, "1", None])
def test_mint_refuses_a_cluster_id_outside_0_to_65535(cluster: object) -> None:
    with pytest.raises(ValueError, match=r"cluster id must be an integer in 0..65535"):
        mint_token(CURRENT, cluster, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("transceiver", [0, -1, 65536, 1.0])
def test_mint_refuses_a_transceiver_id_outside_1_to_65535(transceiver: object) -> None:
    with pytest.raises(ValueError, match=r"transceiver id must be an integer in 1..65535"):
        mint_token(CURRENT, CLUSTER, transceiver)  # type: ignore[arg-type]


@pytest.mark.parametrize("nonce", [b"", b"1234", b"123456"])
def test_mint_refuses_a_nonce_that_is_not_5_bytes(nonce: bytes) -> None:
    with pytest.raises(ValueError, match="nonce must be 5 bytes"):
        mint_token(CURRENT, CLUSTER, 1, nonce=nonce)


def test_thousands_of_random_tokens_use_only_ice_ufrag_characters() -> None:
    for transceiver in range(1, 3001):
        token = mint_token(os.urandom(16), transceiver % 65536, transceiver)
        assert ICE_UFRAG.fullmatch(token), token


@given(
    secret=st.binary(min_size=16, max_size=64),
    cluster=st.integers(0, 65535),
    transceiver=st.integers(1, 65535),
    nonce=st.binary(min_size=5, max_size=5),
)
def test_every_token_is_ice_ufrag_text_and_verifies(
    secret: bytes, cluster: int, transceiver: int, nonce: bytes
) -> None:
    token = mint_token(secret, cluster, transceiver, nonce)
    assert ICE_UFRAG.fullmatch(token)
    claim = TokenVerifier([secret], cluster).verify(token)
    assert claim == RouteClaim(cluster, transceiver, key_id_for(secret), nonce)


# The verifier: configuration


def test_verifier_mints_under_the_current_secret() -> None:
    verifier = TokenVerifier([CURRENT, PREVIOUS], CLUSTER)
    token = verifier.mint(7, nonce=b"12345")
    assert token == mint_token(CURRENT, CLUSTER, 7, nonce=b"12345")
    assert verifier.verify(token).key_id == verifier.current_key_id == 3
    assert verifier.cluster_id == CLUSTER


def test_two_secrets_with_the_same_key_id_are_refused_with_a_remedy() -> None:
    with pytest.raises(ValueError, match=r"same key id 3.*generate another"):
        TokenVerifier([CURRENT, FOREIGN_SAME_KEY_ID], CLUSTER)
    with pytest.raises(ValueError, match="same key id"):
        TokenVerifier([CURRENT, CURRENT], CLUSTER)


@pytest.mark.parametrize("secrets", [[], [CURRENT, PREVIOUS, os.urandom(32)]])
def test_a_verifier_needs_one_or_two_secrets(secrets: list[bytes]) -> None:
    with pytest.raises(ValueError, match="1 or 2 token secrets"):
        TokenVerifier(secrets, CLUSTER)


def test_a_single_secret_passed_bare_is_refused() -> None:
    with pytest.raises(TypeError, match="list of secrets"):
        TokenVerifier(CURRENT, CLUSTER)


@pytest.mark.parametrize("cluster", [-1, 65536])
def test_a_verifier_needs_a_valid_cluster_id(cluster: int) -> None:
    with pytest.raises(ValueError, match="cluster id"):
        TokenVerifier([CURRENT], cluster)


def test_the_verifier_repr_never_shows_a_secret() -> None:
    text = repr(TokenVerifier([CURRENT, PREVIOUS], CLUSTER))
    assert "key_ids=[3, 11]" in text
    assert CURRENT.hex() not in text
    assert repr(CURRENT) not in text


# The verifier: accepting


def test_verify_returns_the_claim(verifier: TokenVerifier) -> None:
    token = mint_token(CURRENT, CLUSTER, 513, nonce=b"\x00\x11\x22\x33\x44")
    assert verifier.verify(token) == RouteClaim(
        cluster_id=CLUSTER, transceiver_id=513, key_id=3, nonce=b"\x00\x11\x22\x33\x44"
    )


def test_verify_accepts_bytes_as_well_as_text(verifier: TokenVerifier) -> None:
    token = mint_token(CURRENT, CLUSTER, 9)
    claim = verifier.verify(token)
    assert verifier.verify(token.encode()) == claim
    assert verifier.verify(bytearray(token.encode())) == claim
    assert verifier.verify(memoryview(token.encode())) == claim


def test_both_current_and_previous_secrets_verify_during_rotation() -> None:
    rotating = TokenVerifier([CURRENT, PREVIOUS], CLUSTER)
    assert rotating.verify(mint_token(CURRENT, CLUSTER, 1)).key_id == 3
    assert rotating.verify(mint_token(PREVIOUS, CLUSTER, 2)).key_id == 11


def test_the_extreme_field_values_verify() -> None:
    verifier = TokenVerifier([CURRENT], 0)
    assert verifier.verify(mint_token(CURRENT, 0, 65535)).transceiver_id == 65535
    verifier = TokenVerifier([CURRENT], 65535)
    assert verifier.verify(mint_token(CURRENT, 65535, 1)).cluster_id == 65535


# The verifier: rejecting


def test_token_errors_are_protocol_errors() -> None:
    for error in (
        MalformedTokenError,
        UnsupportedTokenVersionError,
        UnknownTokenKeyError,
        BadTokenMacError,
        WrongClusterError,
    ):
        assert issubclass(error, TokenError)
    assert issubclass(TokenError, ProtocolError)


def test_a_token_under_a_removed_secret_has_an_unknown_key() -> None:
    old_token = mint_token(PREVIOUS, CLUSTER, 1)
    after_rotation = TokenVerifier([CURRENT], CLUSTER)
    with pytest.raises(UnknownTokenKeyError, match=r"key id 11 matches no configured secret"):
        after_rotation.verify(old_token)


def test_a_token_under_a_foreign_secret_with_a_known_key_id_is_forged(
    verifier: TokenVerifier,
) -> None:
    with pytest.raises(BadTokenMacError, match="forged or corrupted"):
        verifier.verify(mint_token(FOREIGN_SAME_KEY_ID, CLUSTER, 1))


def test_a_token_of_another_cluster_is_refused(verifier: TokenVerifier) -> None:
    with pytest.raises(WrongClusterError, match=f"names cluster 43, this is cluster {CLUSTER}"):
        verifier.verify(mint_token(CURRENT, CLUSTER + 1, 1))


@pytest.mark.parametrize("version", [0, 2, 15])
def test_a_token_of_another_version_is_refused(verifier: TokenVerifier, version: int) -> None:
    token = signed_token(CURRENT, version << 4 | 3, CLUSTER, 1)
    with pytest.raises(UnsupportedTokenVersionError, match=f"version {version} is not supported"):
        verifier.verify(token)


def test_a_signed_token_naming_transceiver_0_is_malformed(verifier: TokenVerifier) -> None:
    token = signed_token(CURRENT, 0x13, CLUSTER, 0)
    with pytest.raises(MalformedTokenError, match="transceiver 0"):
        verifier.verify(token)


def test_an_unknown_key_id_is_refused_before_the_mac_is_checked(verifier: TokenVerifier) -> None:
    # The MAC below is garbage too; the cheap key id check must be the one that answers.
    token = base64.b64encode(b"\x1f" + bytes(17)).decode()
    with pytest.raises(UnknownTokenKeyError):
        verifier.verify(token)


@pytest.mark.parametrize("bit", range(18 * 8))
def test_every_single_bit_flip_of_the_encoded_bytes_is_refused(bit: int) -> None:
    verifier = TokenVerifier([CURRENT, PREVIOUS], CLUSTER)
    token = mint_token(CURRENT, CLUSTER, 0x0101, nonce=b"nonce")
    flipped = flip_bit(token, bit)
    expected: type[TokenError]
    if bit < 4:
        expected = UnsupportedTokenVersionError
    elif bit < 8:
        # Key id 3 -> another id: unknown, unless it lands on PREVIOUS (11 = 3 ^ 8).
        expected = BadTokenMacError if bit == 4 else UnknownTokenKeyError
    elif bit < 24:
        expected = WrongClusterError
    else:
        expected = BadTokenMacError  # transceiver 0x0101 cannot become 0 with one flip
    with pytest.raises(expected):
        verifier.verify(flipped)


@pytest.mark.parametrize("position", range(24))
def test_every_single_bit_flip_of_the_text_is_refused(position: int) -> None:
    verifier = TokenVerifier([CURRENT, PREVIOUS], CLUSTER)
    token = mint_token(CURRENT, CLUSTER, 77)
    for bit in range(8):
        flipped = bytearray(token.encode())
        flipped[position] ^= 1 << bit
        with pytest.raises(TokenError):
            verifier.verify(bytes(flipped))


@pytest.mark.parametrize("length", range(24))
def test_truncated_tokens_are_malformed(verifier: TokenVerifier, length: int) -> None:
    token = mint_token(CURRENT, CLUSTER, 1)
    with pytest.raises(MalformedTokenError, match=f"must be 24 characters, got {length}"):
        verifier.verify(token[:length])


@pytest.mark.parametrize("suffix", ["A", "=", "==", "AAAA"])
def test_extended_tokens_are_malformed(verifier: TokenVerifier, suffix: str) -> None:
    with pytest.raises(MalformedTokenError, match="must be 24 characters"):
        verifier.verify(mint_token(CURRENT, CLUSTER, 1) + suffix)


@pytest.mark.parametrize("position", range(24))
@pytest.mark.parametrize("character", ["=", "-", "_", ":", " ", "\x00", "é"])
def test_characters_outside_the_ice_alphabet_are_malformed(
    verifier: TokenVerifier, position: int, character: str
) -> None:
    token = mint_token(CURRENT, CLUSTER, 1)
    bad = token[:position] + character + token[position + 1 :]
    with pytest.raises(MalformedTokenError):
        verifier.verify(bad)
    if character.isascii():
        with pytest.raises(MalformedTokenError, match="may only use A-Z a-z 0-9"):
            verifier.verify(bad.encode())


def test_the_urlsafe_spelling_of_a_valid_token_is_malformed(verifier: TokenVerifier) -> None:
    for transceiver in range(1, 200):
        token = mint_token(CURRENT, CLUSTER, transceiver)
        if "+" in token or "/" in token:
            break
    assert "+" in token or "/" in token
    urlsafe = token.replace("+", "-").replace("/", "_")
    with pytest.raises(MalformedTokenError, match=r"found '[-_]+'"):
        verifier.verify(urlsafe)


def test_a_whole_stun_username_is_not_a_token(verifier: TokenVerifier) -> None:
    token = mint_token(CURRENT, CLUSTER, 1)
    with pytest.raises(MalformedTokenError, match="must be 24 characters, got 29"):
        verifier.verify(f"{token}:1Zid")


def _verify_or_reject(verifier: TokenVerifier, ufrag: bytes | str) -> RouteClaim | None:
    try:
        return verifier.verify(ufrag)
    except TokenError:
        return None


@settings(max_examples=300)
@given(ufrag=st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_random_input_raises_only_token_error(ufrag: bytes | str) -> None:
    assert _verify_or_reject(TokenVerifier([CURRENT, PREVIOUS], CLUSTER), ufrag) is None


@settings(max_examples=300)
@given(
    ufrag=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        min_size=24,
        max_size=24,
    )
)
def test_random_well_formed_tokens_are_refused(ufrag: str) -> None:
    assert _verify_or_reject(TokenVerifier([CURRENT, PREVIOUS], CLUSTER), ufrag) is None


@given(
    transceiver=st.integers(1, 65535),
    edits=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_a_mutated_token_is_refused_or_unchanged(
    transceiver: int, edits: list[tuple[int, int]]
) -> None:
    verifier = TokenVerifier([CURRENT, PREVIOUS], CLUSTER)
    token = mint_token(CURRENT, CLUSTER, transceiver).encode()
    mutated = bytearray(token)
    for position, value in edits:
        mutated[position] = value
    claim = _verify_or_reject(verifier, bytes(mutated))
    assert claim is None or bytes(mutated) == token
