"""Which protocol a datagram on a WebRTC 5-tuple carries, from its first byte (RFC 7983).

A WebRTC client sends STUN, DTLS and SRTP/SRTCP over one UDP 5-tuple, with no framing to
tell them apart. RFC 7983 (updating RFC 5764 section 5.1.2) assigns each a disjoint range
of first-byte values, so the transceiver can route a datagram to ICE-lite, DTLS or SRTP
by looking at one byte:

=========  ==============================================================
first byte protocol
=========  ==============================================================
0..3       STUN (the two most significant bits of a STUN header are zero)
16..19     ZRTP (never used by WebRTC: "other")
20..63     DTLS (content types 20..63)
64..79     TURN channel data (never sent to us: "other")
128..191   RTP or RTCP (version 2); RFC 5761 tells those two apart
=========  ==============================================================

Anything else matches no protocol and must be dropped.
"""

from typing import Final, Literal

__all__ = ["PacketKind", "classify", "classify_datagram"]

PacketKind = Literal["stun", "dtls", "rtp", "other"]

# One entry per possible first byte, so classification is a single index on the hot path.
_KINDS: Final[tuple[PacketKind, ...]] = tuple(
    "stun"
    if byte <= 3
    else "dtls"
    if 20 <= byte <= 63
    else "rtp"
    if 128 <= byte <= 191
    else "other"
    for byte in range(256)
)


def classify(first_byte: int) -> PacketKind:
    """Return the protocol of a datagram whose first byte is ``first_byte`` (0..255).

    ``"rtp"`` covers RTP and RTCP alike. Raises :class:`ValueError` for an integer outside
    0..255, which no datagram can start with.
    """
    if not 0 <= first_byte <= 255:
        raise ValueError(f"first byte {first_byte} is not in 0..255")
    return _KINDS[first_byte]


def classify_datagram(data: bytes | bytearray | memoryview) -> PacketKind:
    """Return the protocol of ``data`` by its first byte; an empty datagram is ``"other"``."""
    if not data:
        return "other"
    return _KINDS[data[0]]
