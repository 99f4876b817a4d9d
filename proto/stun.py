"""The relay worker's STUN reader: is this datagram STUN, and what is its USERNAME?

A relay worker that has no route for a client looks at the client's first packet, which
for a WebRTC client is an ICE connectivity check (a STUN binding request, RFC 8489 and
RFC 8445). The server half of its USERNAME (``server-ufrag:client-ufrag``) is the routing
token that names the transceiver. That is all this module does; the full STUN codec the
transceiver needs for ICE-lite lives elsewhere.

It runs on the worker's hot path, so it reads straight from the receive buffer (``bytes``,
``bytearray``, or a ``memoryview`` of a larger preallocated buffer of which only the first
``length`` bytes are the datagram), never copies the message, and allocates nothing but
the USERNAME value it returns. It never reads past the message length of the STUN header,
and for malformed input it raises :class:`StunError` and nothing else.
"""

import struct
from typing import Final

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "BINDING_REQUEST",
    "HEADER_LENGTH",
    "MAX_USERNAME_LENGTH",
    "STUN_MAGIC_COOKIE",
    "USERNAME",
    "StunError",
    "is_stun",
    "read_username",
    "server_ufrag",
    "split_username",
]

STUN_MAGIC_COOKIE: Final = 0x2112A442
HEADER_LENGTH: Final = 20
BINDING_REQUEST: Final = 0x0001
USERNAME: Final = 0x0006
MAX_USERNAME_LENGTH: Final = 513
"""Longest USERNAME accepted, in bytes.

RFC 8839 allows ICE ufrags of up to 256 characters, so ``server:client`` is at most
513 bytes. (RFC 8489 asks senders for fewer than 509 bytes and receivers to parse up to
763 for RFC 5389 compatibility; nothing longer than 513 can be an ICE username.)
"""

# message type, message length, magic cookie; the 12-byte transaction id follows.
_HEADER = struct.Struct("!HHI")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_ATTRIBUTE_HEADER_LENGTH: Final = 4

BufferLike = bytes | bytearray | memoryview


class StunError(ProtocolError):
    """A datagram that is not a STUN binding request with a usable USERNAME."""


def is_stun(data: BufferLike, length: int) -> bool:
    """Return whether the first ``length`` bytes of ``data`` look like one STUN message.

    The checks: first byte 0..3 (RFC 7983 demultiplexing), at least a 20-byte header,
    the magic cookie, and a message length that is a multiple of 4 and fits in
    ``length``. Never raises for a bytes-like ``data`` and an integer ``length``; a
    ``length`` outside ``0..len(data)`` is simply not STUN.
    """
    if length < HEADER_LENGTH or length > len(data) or data[0] > 3:
        return False
    _, message_length, cookie = _HEADER.unpack_from(data)
    return (
        cookie == STUN_MAGIC_COOKIE
        and message_length & 3 == 0
        and HEADER_LENGTH + message_length <= length
    )


def read_username(data: BufferLike, length: int) -> bytes:
    """Return the USERNAME value of the binding request in the first ``length`` bytes.

    Raises :class:`StunError` if the datagram is not STUN, not a binding request, has an
    attribute running past the message, or has no USERNAME, an empty one, or one longer
    than :data:`MAX_USERNAME_LENGTH`. Attributes after the message length are ignored.
    """
    if not is_stun(data, length):
        raise StunError(_why_not_stun(data, length))
    message_type, message_length, _ = _HEADER.unpack_from(data)
    if message_type != BINDING_REQUEST:
        raise StunError(f"STUN message type 0x{message_type:04x} is not a binding request (0x0001)")
    end = HEADER_LENGTH + message_length
    offset = HEADER_LENGTH
    # `end - offset` stays a multiple of 4 (is_stun checked the message length, and every
    # step is padded to 4), so an attribute header always fits whole, and a value that
    # fits also fits with its padding.
    while offset < end:
        attribute_type, attribute_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        value_start = offset + _ATTRIBUTE_HEADER_LENGTH
        value_end = value_start + attribute_length
        if value_end > end:
            raise StunError(
                f"STUN attribute 0x{attribute_type:04x} at offset {offset} declares "
                f"{attribute_length} bytes, running past the end of the message at {end}"
            )
        if attribute_type == USERNAME:
            if attribute_length == 0:
                raise StunError("STUN USERNAME is empty")
            if attribute_length > MAX_USERNAME_LENGTH:
                raise StunError(
                    f"STUN USERNAME is {attribute_length} bytes, longer than the "
                    f"{MAX_USERNAME_LENGTH} an ICE username can be"
                )
            value = data[value_start:value_end]
            # Slicing bytes copies just the value; bytearray/memoryview need one conversion.
            return value if type(value) is bytes else bytes(value)
        offset = value_start + ((attribute_length + 3) & ~3)
    raise StunError("STUN binding request has no USERNAME attribute")


def split_username(value: bytes) -> tuple[bytes, bytes]:
    """Split an ICE USERNAME ``server-ufrag:client-ufrag`` into its two halves.

    Splits on the first ``:``; ufrags never contain one (RFC 8839 ice-char).
    """
    server, colon, client = value.partition(b":")
    if not colon:
        raise StunError(f"STUN USERNAME {value[:64]!r} has no ':' between server and client ufrag")
    if not server:
        raise StunError(f"STUN USERNAME {value[:64]!r} has an empty server ufrag")
    if not client:
        raise StunError(f"STUN USERNAME {value[:64]!r} has an empty client ufrag")
    return server, client


def server_ufrag(data: BufferLike, length: int) -> bytes:
    """Return the server ufrag (the routing token) of a binding request's USERNAME."""
    return split_username(read_username(data, length))[0]


def _why_not_stun(data: BufferLike, length: int) -> str:
    """Say which check of :func:`is_stun` failed (error path only)."""
    if length < 0 or length > len(data):
        return f"datagram length {length} is outside the {len(data)}-byte buffer"
    if length < HEADER_LENGTH:
        return f"datagram of {length} bytes is shorter than a STUN header ({HEADER_LENGTH})"
    if data[0] > 3:
        return f"first byte {data[0]} is not 0..3, so not STUN (RFC 7983)"
    _, message_length, cookie = _HEADER.unpack_from(data)
    if cookie != STUN_MAGIC_COOKIE:
        return f"magic cookie 0x{cookie:08x} is not 0x{STUN_MAGIC_COOKIE:08x}, so not STUN"
    if message_length & 3:
        return f"STUN message length {message_length} is not a multiple of 4"
    return (
        f"STUN message length {message_length} runs past the {length}-byte datagram "
        f"(needs {HEADER_LENGTH + message_length})"
    )
