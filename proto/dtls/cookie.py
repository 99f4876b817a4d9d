"""Stateless HelloVerifyRequest cookies (RFC 6347 4.2.1).

cookie = HMAC-SHA256(secret, time bucket || peer address || the ClientHello fields the
client must repeat: version, random, session_id, cipher_suites, compression_methods).
A cookie is accepted in the bucket it was minted in and the next one, so its lifetime is
between one and two buckets. Because nothing is stored, a transceiver can answer
spoofed-source ClientHello floods before creating any per-peer state.
"""

from __future__ import annotations

import hashlib
import hmac
import math

from .handshake import ClientHello
from .wire import uint16_list, vector

COOKIE_SIZE = 32


class HelloCookies:
    def __init__(self, secret: bytes, bucket_seconds: float = 30.0) -> None:
        if len(secret) < 16:
            raise ValueError("cookie secret must be at least 16 bytes")
        if bucket_seconds <= 0:
            raise ValueError("cookie bucket_seconds must be positive")
        self._secret = secret
        self._bucket_seconds = bucket_seconds

    def _mac(self, hello: ClientHello, peer_address: bytes, bucket: int) -> bytes:
        message = (
            bucket.to_bytes(8, "big", signed=True)
            + vector(peer_address, 2)
            + hello.client_version.to_bytes(2, "big")
            + hello.random
            + vector(hello.session_id, 1)
            + uint16_list(hello.cipher_suites, 2)
            + vector(hello.compression_methods, 1)
        )
        return hmac.digest(self._secret, message, hashlib.sha256)[:COOKIE_SIZE]

    def _bucket(self, now: float) -> int:
        return math.floor(now / self._bucket_seconds)

    def make(self, hello: ClientHello, peer_address: bytes, now: float) -> bytes:
        return self._mac(hello, peer_address, self._bucket(now))

    def verify(self, hello: ClientHello, peer_address: bytes, now: float) -> bool:
        if len(hello.cookie) != COOKIE_SIZE:
            return False
        bucket = self._bucket(now)
        return any(
            hmac.compare_digest(hello.cookie, self._mac(hello, peer_address, b))
            for b in (bucket, bucket - 1)
        )
