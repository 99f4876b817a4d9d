"""Routing tokens: the server half of an ICE ufrag, naming the transceiver of a session.

A transceiver mints a token when it answers an offer; the browser echoes it as the server
half of the USERNAME (``server-ufrag:client-ufrag``) in its STUN binding requests. A relay
worker that has no route yet for the client verifies the token and learns which
transceiver to forward to, without any shared state beyond the secret.

Format (docs/internals.md): 24 characters of standard base64 without padding, encoding
18 bytes. The alphabet ``A-Z a-z 0-9 + /`` is exactly the ICE ufrag character set of
RFC 8839, and 18 bytes fill 24 characters with no spare bits, so each token has exactly
one spelling::

    offset  size  field
    0       1     high nibble: token version (1); low nibble: key id (0-15)
    1       2     cluster id, big endian
    3       2     transceiver id, big endian (0 is invalid)
    5       5     random nonce (40 bits)
    10      8     HMAC-SHA256(secret, bytes 0..9) truncated to 8 bytes

Verification runs on a relay worker for every STUN request that misses the routing table,
so a flood of junk must be cheap to reject: length and alphabet are checked before
decoding, then version, key id and cluster from the plain bytes, and only then one HMAC,
compared in constant time. A :class:`WrongClusterError` therefore says what the token
claims, not that the claim is authentic.

Secrets rotate by configuring two (current, previous): tokens are minted under the current
one and verified under either, and each secret's key id (derived from the secret) picks
which one a token needs.
"""

import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "MAX_CLUSTER_ID",
    "MAX_TRANSCEIVER_ID",
    "MIN_SECRET_LENGTH",
    "NONCE_LENGTH",
    "TOKEN_LENGTH",
    "TOKEN_VERSION",
    "BadTokenMacError",
    "MalformedTokenError",
    "RouteClaim",
    "TokenError",
    "TokenVerifier",
    "UnknownTokenKeyError",
    "UnsupportedTokenVersionError",
    "WrongClusterError",
    "key_id_for",
    "mint_token",
]

TOKEN_VERSION: Final = 1
TOKEN_LENGTH: Final = 24
"""Characters in a token: base64 of 18 bytes, no padding."""
NONCE_LENGTH: Final = 5
MIN_SECRET_LENGTH: Final = 16
MAX_CLUSTER_ID: Final = 0xFFFF
MAX_TRANSCEIVER_ID: Final = 0xFFFF

_MAC_LENGTH: Final = 8
_SIGNED_LENGTH: Final = 10  # bytes 0..9 are covered by the MAC
_KEY_ID_LABEL: Final = b"voxrelay key id"
_KEY_ID_COUNT: Final = 16
# version|key id, cluster id, transceiver id; the nonce follows.
_CLAIM_FIELDS = struct.Struct("!BHH")
# Deleting every allowed character leaves nothing iff the token uses only those characters.
_TOKEN_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class TokenError(ProtocolError):
    """A routing token that does not route: malformed, forged, stale or foreign."""


class MalformedTokenError(TokenError):
    """Not 24 characters of unpadded standard base64, or a field out of range."""


class UnsupportedTokenVersionError(TokenError):
    """A well-formed token of a version this build does not know."""


class UnknownTokenKeyError(TokenError):
    """A token whose key id matches no configured secret (a removed or foreign secret)."""


class BadTokenMacError(TokenError):
    """A token whose MAC does not verify: forged or corrupted."""


class WrongClusterError(TokenError):
    """A token that names another cluster than the verifier's."""


@dataclass(frozen=True, slots=True)
class RouteClaim:
    """What a verified token says: which transceiver of which cluster owns the session."""

    cluster_id: int
    transceiver_id: int
    key_id: int
    nonce: bytes


def key_id_for(secret: bytes) -> int:
    """Return the key id (0..15) that tokens minted under ``secret`` carry.

    Derived from the secret so operators never configure it: the first nibble of
    SHA-256(b"voxrelay key id" + secret).
    """
    _check_secret(secret)
    return hashlib.sha256(_KEY_ID_LABEL + bytes(secret)).digest()[0] >> 4


def mint_token(
    secret: bytes, cluster_id: int, transceiver_id: int, nonce: bytes | None = None
) -> str:
    """Return a 24-character token routing to ``transceiver_id`` in ``cluster_id``.

    ``nonce`` (5 bytes) defaults to fresh random bytes, so two sessions on the same
    transceiver get different ufrags; pass it only for reproducible tests.
    """
    _check_secret(secret)
    return _mint(bytes(secret), key_id_for(secret), cluster_id, transceiver_id, nonce)


class TokenVerifier:
    """Verifies routing tokens for one cluster under one or two secrets.

    ``secrets`` is ``[current]`` or ``[current, previous]``: tokens minted under either
    verify, :meth:`mint` uses the current one. To rotate, deploy ``[new, old]`` everywhere,
    wait out the longest session, then deploy ``[new]``.
    """

    __slots__ = ("_cluster_id", "_current_key_id", "_current_secret", "_mac_by_key_id")

    def __init__(self, secrets: Sequence[bytes], cluster_id: int) -> None:
        if isinstance(secrets, bytes | bytearray | memoryview | str):
            raise TypeError("secrets must be a list of secrets ([current] or [current, old])")
        if not 1 <= len(secrets) <= 2:
            raise ValueError(
                f"configure 1 or 2 token secrets (current, then previous), got {len(secrets)}"
            )
        _check_cluster_id(cluster_id)
        # Keyed HMAC states indexed by key id: copying one skips re-keying for every token,
        # about a third off each MAC, which is what a flood of forged tokens costs us.
        mac_by_key_id: list[hmac.HMAC | None] = [None] * _KEY_ID_COUNT
        for index, secret in enumerate(secrets):
            key_id = key_id_for(secret)
            if mac_by_key_id[key_id] is not None:
                raise ValueError(
                    f"token secrets #1 and #{index + 1} have the same key id {key_id}, so "
                    "a token could not say which one it was minted under; generate another "
                    "current secret (1 in 16 pairs collide)"
                )
            mac_by_key_id[key_id] = hmac.new(bytes(secret), digestmod=hashlib.sha256)
        self._mac_by_key_id = tuple(mac_by_key_id)
        self._cluster_id = cluster_id
        self._current_secret = bytes(secrets[0])
        self._current_key_id = key_id_for(secrets[0])

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def current_key_id(self) -> int:
        """The key id of tokens that :meth:`mint` returns."""
        return self._current_key_id

    def mint(self, transceiver_id: int, nonce: bytes | None = None) -> str:
        """Return a token for ``transceiver_id`` in this cluster, under the current secret."""
        return _mint(
            self._current_secret, self._current_key_id, self._cluster_id, transceiver_id, nonce
        )

    def verify(self, ufrag: bytes | str) -> RouteClaim:
        """Return the claim of the server ufrag ``ufrag``, or raise a :class:`TokenError`.

        Pass the server half only (before the ``:`` of the STUN USERNAME).
        """
        if isinstance(ufrag, str):
            if len(ufrag) != TOKEN_LENGTH or not ufrag.isascii():
                raise MalformedTokenError(_bad_length_or_alphabet(ufrag))
            ufrag = ufrag.encode("ascii")
        elif len(ufrag) != TOKEN_LENGTH:
            raise MalformedTokenError(_bad_length_or_alphabet(ufrag))
        elif not isinstance(ufrag, bytes):
            ufrag = bytes(ufrag)  # bytearray or memoryview: translate() needs bytes
        if ufrag.translate(None, _TOKEN_ALPHABET):
            raise MalformedTokenError(_bad_length_or_alphabet(ufrag))
        # 24 alphabet characters without padding always decode to exactly 18 bytes.
        token = binascii.a2b_base64(ufrag)

        version_and_key_id, cluster_id, transceiver_id = _CLAIM_FIELDS.unpack_from(token)
        version = version_and_key_id >> 4
        if version != TOKEN_VERSION:
            raise UnsupportedTokenVersionError(
                f"routing token version {version} is not supported (expected "
                f"{TOKEN_VERSION}); was it minted by a newer transceiver?"
            )
        key_id = version_and_key_id & 0x0F
        keyed_mac = self._mac_by_key_id[key_id]
        if keyed_mac is None:
            raise UnknownTokenKeyError(
                f"routing token key id {key_id} matches no configured secret (configured: "
                f"{self._configured_key_ids()}); minted under a removed or foreign secret?"
            )
        if cluster_id != self._cluster_id:
            raise WrongClusterError(
                f"routing token names cluster {cluster_id}, this is cluster {self._cluster_id}"
            )
        if transceiver_id == 0:
            raise MalformedTokenError("routing token names transceiver 0, which is invalid")
        mac = keyed_mac.copy()
        mac.update(token[:_SIGNED_LENGTH])
        if not hmac.compare_digest(mac.digest()[:_MAC_LENGTH], token[_SIGNED_LENGTH:]):
            raise BadTokenMacError("routing token MAC does not verify: forged or corrupted")
        nonce = token[_CLAIM_FIELDS.size : _SIGNED_LENGTH]
        return RouteClaim(cluster_id, transceiver_id, key_id, nonce)

    def _configured_key_ids(self) -> str:
        return ", ".join(
            str(key_id) for key_id, mac in enumerate(self._mac_by_key_id) if mac is not None
        )

    def __repr__(self) -> str:  # never show the secrets
        return (
            f"TokenVerifier(cluster_id={self._cluster_id}, "
            f"key_ids=[{self._configured_key_ids()}], current_key_id={self._current_key_id})"
        )


def _mint(
    secret: bytes, key_id: int, cluster_id: int, transceiver_id: int, nonce: bytes | None
) -> str:
    _check_cluster_id(cluster_id)
    if not isinstance(transceiver_id, int) or not 1 <= transceiver_id <= MAX_TRANSCEIVER_ID:
        raise ValueError(
            f"transceiver id must be an integer in 1..{MAX_TRANSCEIVER_ID}, got {transceiver_id!r}"
        )
    if nonce is None:
        nonce = os.urandom(NONCE_LENGTH)
    elif len(nonce) != NONCE_LENGTH:
        raise ValueError(f"token nonce must be {NONCE_LENGTH} bytes, got {len(nonce)}")
    signed = _CLAIM_FIELDS.pack(TOKEN_VERSION << 4 | key_id, cluster_id, transceiver_id) + bytes(
        nonce
    )
    mac = hmac.digest(secret, signed, "sha256")[:_MAC_LENGTH]
    return binascii.b2a_base64(signed + mac, newline=False).decode("ascii")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"token secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"token secret must be at least {MIN_SECRET_LENGTH} bytes, got {len(secret)}; "
            "generate one with os.urandom(32)"
        )


def _check_cluster_id(cluster_id: int) -> None:
    if not isinstance(cluster_id, int) or not 0 <= cluster_id <= MAX_CLUSTER_ID:
        raise ValueError(
            f"cluster id must be an integer in 0..{MAX_CLUSTER_ID}, got {cluster_id!r}"
        )


def _bad_length_or_alphabet(ufrag: bytes | bytearray | memoryview | str) -> str:
    """Explain why ``ufrag`` is not token-shaped (error path only, so it may be slow)."""
    if len(ufrag) != TOKEN_LENGTH:
        return f"routing token must be {TOKEN_LENGTH} characters, got {len(ufrag)}"
    text = ufrag if isinstance(ufrag, str) else bytes(ufrag).decode("latin-1")
    allowed = _TOKEN_ALPHABET.decode("ascii")
    bad = "".join(sorted({char for char in text if char not in allowed}))
    return f"routing token may only use A-Z a-z 0-9 + / (unpadded base64), found {bad!r}"
