"""The 24-byte relay header: which client a datagram came from, or goes to.

Every datagram between a relay worker and a transceiver starts with this header (see
docs/internals.md). Relay -> transceiver it names the client the payload came from;
transceiver -> relay it names the client to send the payload to. The payload (DTLS, RTP,
RTCP, STUN) follows unchanged.

Version 1 layout, all integers big endian::

    offset  size  field
    0       1     version = 1
    1       1     address family: 4 or 6
    2       2     client UDP port, non-zero
    4       4     reserved, zero (a v1 receiver rejects non-zero)
    8       16    client IP: IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) when family is 4

The header of a client is also its *route key* in the shared routing table, so it must be
canonical: one client, one byte string. That is why an IPv4 client is always family 4,
whether its address arrived as ``"192.0.2.1"`` (an AF_INET socket) or as
``"::ffff:192.0.2.1"`` (a dual-stack AF_INET6 socket), and why a header claiming family 6
for an IPv4-mapped address is rejected rather than silently accepted as a second key for
the same client.

The header cannot carry an IPv6 scope id, so link-local clients (``fe80::1%eth0``) are
refused: a reply to them without the scope would go out of the wrong interface.

In either direction a sender may instead send a *bundle*: one datagram carrying several
client datagrams, so the kernel does one UDP send for many packets. A bundle is one or more
records, each a 4-byte prefix, a v1 header and the payload::

    offset  size    field
    0       1       record marker = 2 (so a bundle datagram's first byte is 2)
    1       1       reserved, zero
    2       2       payload length, big endian
    4       24      v1 relay header of the client (the route key, as above)
    28      length  payload

A receiver tells the kinds apart by the first byte: 1 is a single v1 datagram, 2 a bundle
(a client's own datagrams start with 0, 20-63 or 128-191, RFC 7983, so neither collides).
Transceiver -> relay, a record with an empty payload releases the client's route.

``socket.inet_pton``/``inet_ntop`` are used as pure text <-> bytes conversions (they are
the fastest strict parsers in the standard library); this module opens no socket.
"""

import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "BUNDLE_MARKER",
    "FAMILY_IPV4",
    "FAMILY_IPV6",
    "HEADER_SIZE",
    "MAX_RECORD_PAYLOAD",
    "RECORD_OVERHEAD",
    "RECORD_PREFIX_SIZE",
    "VERSION",
    "RelayBundleError",
    "RelayHeaderError",
    "bundle_decode",
    "bundle_encode",
    "bundle_of_records",
    "bundle_records",
    "decode_header",
    "encode_header",
    "encode_record",
    "header_from_address",
    "route_key_from_sockaddr",
]

HEADER_SIZE: Final = 24
VERSION: Final = 1
FAMILY_IPV4: Final = 4
FAMILY_IPV6: Final = 6
BUNDLE_MARKER: Final = 2  # first byte of every bundle record, hence of a bundle datagram
RECORD_PREFIX_SIZE: Final = 4
RECORD_OVERHEAD: Final = RECORD_PREFIX_SIZE + HEADER_SIZE  # bytes a record adds to a payload
MAX_RECORD_PAYLOAD: Final = 0xFFFF
_RECORD_PREFIX = struct.Struct(">BBH")  # marker, reserved, payload length

# version, family, port, reserved; the 16 address bytes follow.
_FIXED_FIELDS = struct.Struct("!BBHI")
_V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"
_ADDRESS_OFFSET: Final = _FIXED_FIELDS.size


class RelayHeaderError(ProtocolError):
    """A relay header that is malformed, or a client address that cannot be encoded."""


class RelayBundleError(RelayHeaderError):
    """A malformed bundle record; ``index`` records before it (``offset`` bytes) were valid."""

    def __init__(self, message: str, index: int = 0, offset: int = 0) -> None:
        super().__init__(message)
        self.index = index
        self.offset = offset


_Buffer = TypeVar("_Buffer", bytes, bytearray, memoryview)


def encode_header(host: str, port: int) -> bytes:
    """Return the 24-byte header (and route key) for the client at ``host``:``port``.

    ``host`` is IPv4 or IPv6 text; IPv4 and IPv4-mapped IPv6 text both give family 4.
    """
    if not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise RelayHeaderError(f"client port must be an integer in 1..65535, got {port!r}")
    if not isinstance(host, str):
        raise RelayHeaderError(f"client host must be IP address text, got {host!r}")
    if "%" in host:
        raise RelayHeaderError(
            f"client address {host!r} has an IPv6 scope id, which the relay header cannot "
            "carry; link-local clients are not supported"
        )
    try:
        if ":" in host:
            address = socket.inet_pton(socket.AF_INET6, host)
        else:
            address = _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):  # OSError: not an address; ValueError: embedded NUL
        raise RelayHeaderError(f"client host {host!r} is not an IPv4 or IPv6 address") from None
    family = FAMILY_IPV4 if address.startswith(_V4_MAPPED_PREFIX) else FAMILY_IPV6
    return _FIXED_FIELDS.pack(VERSION, family, port, 0) + address


def decode_header(data: bytes | bytearray | memoryview) -> tuple[str, int]:
    """Return ``(host, port)`` from the header at the start of ``data``.

    ``data`` may continue past the header (header + payload). An IPv4 client's host is
    dotted-quad text; an IPv6 client's host is compressed IPv6 text.
    """
    if len(data) < HEADER_SIZE:
        raise RelayHeaderError(f"relay header truncated: need {HEADER_SIZE} bytes, got {len(data)}")
    version, family, port, reserved = _FIXED_FIELDS.unpack_from(data)
    if version != VERSION:
        raise RelayHeaderError(
            f"unsupported relay header version {version} (this build speaks {VERSION}); "
            "are the relay workers and transceivers running the same release?"
        )
    if family not in (FAMILY_IPV4, FAMILY_IPV6):
        raise RelayHeaderError(f"relay header address family must be 4 or 6, got {family}")
    if port == 0:
        raise RelayHeaderError("relay header client port is 0")
    if reserved != 0:
        raise RelayHeaderError(
            f"relay header reserved field must be zero in version {VERSION}, got 0x{reserved:08x}"
        )
    address = bytes(data[_ADDRESS_OFFSET:HEADER_SIZE])
    is_v4_mapped = address.startswith(_V4_MAPPED_PREFIX)
    if family == FAMILY_IPV4:
        if not is_v4_mapped:
            raise RelayHeaderError(
                f"relay header family 4 needs an IPv4-mapped address (::ffff:a.b.c.d), "
                f"got {socket.inet_ntop(socket.AF_INET6, address)}"
            )
        return socket.inet_ntop(socket.AF_INET, address[12:]), port
    if is_v4_mapped:
        raise RelayHeaderError(
            f"relay header family 6 with IPv4-mapped address "
            f"{socket.inet_ntop(socket.AF_INET6, address)}; IPv4 clients must be family 4 "
            "so that each client has exactly one route key"
        )
    return socket.inet_ntop(socket.AF_INET6, address), port


def route_key_from_sockaddr(family: int, host: str, port: int) -> bytes:
    """Return the route key of a client given as a socket family and address.

    ``family`` is ``socket.AF_INET`` or ``socket.AF_INET6``; the key is the client's
    relay header, exactly what :func:`encode_header` returns.
    """
    if family == socket.AF_INET:
        if ":" in str(host):
            raise RelayHeaderError(f"AF_INET address {host!r} is not IPv4 text")
    elif family == socket.AF_INET6:
        if ":" not in str(host):
            raise RelayHeaderError(f"AF_INET6 address {host!r} is not IPv6 text")
    else:
        raise RelayHeaderError(
            f"socket family must be AF_INET ({int(socket.AF_INET)}) or AF_INET6 "
            f"({int(socket.AF_INET6)}), got {family!r}"
        )
    return encode_header(host, port)


def header_from_address(addr: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """Return the relay header for an address as ``socket.recvfrom`` returns it.

    Accepts ``(host, port)`` from an AF_INET socket and ``(host, port, flowinfo,
    scope_id)`` from an AF_INET6 socket; IPv4 clients of a dual-stack socket
    (``::ffff:a.b.c.d``) get the same key as on an AF_INET socket.
    """
    if not isinstance(addr, tuple) or len(addr) not in (2, 4):
        raise RelayHeaderError(
            f"expected a (host, port) or (host, port, flowinfo, scope_id) tuple, got {addr!r}"
        )
    if len(addr) == 4 and addr[3]:
        raise RelayHeaderError(
            f"client address {addr[0]!r} has IPv6 scope id {addr[3]!r}, which the relay "
            "header cannot carry; link-local clients are not supported"
        )
    return encode_header(addr[0], addr[1])


def encode_record(header: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """One bundle record: prefix, the client's 24-byte ``header`` (as-is), ``payload``."""
    if len(header) != HEADER_SIZE:
        raise RelayBundleError(f"a record's header must be {HEADER_SIZE} bytes, got {len(header)}")
    if len(payload) > MAX_RECORD_PAYLOAD:
        raise RelayBundleError(
            f"a record's payload is at most {MAX_RECORD_PAYLOAD} bytes, got {len(payload)}"
        )
    return _RECORD_PREFIX.pack(BUNDLE_MARKER, 0, len(payload)) + header + payload


def bundle_of_records(records: Iterable[tuple[bytes, bytes | bytearray | memoryview]]) -> bytes:
    """A bundle datagram of ``(24-byte header, payload)`` records, in order: what a
    transceiver sends a relay worker, its headers already made. At least one record."""
    parts = [encode_record(header, payload) for header, payload in records]
    if not parts:
        raise RelayBundleError("a bundle needs at least one record")
    return b"".join(parts)


def bundle_encode(
    records: Iterable[tuple[tuple[str, int], bytes | bytearray | memoryview]],
) -> bytes:
    """A bundle datagram of ``(client (host, port), payload)`` records, in order.

    What a relay worker sends (it builds the same bytes with scatter-gather instead); here
    for tests and tools. At least one record: an empty bundle is not a datagram.
    """
    return bundle_of_records((encode_header(*client), payload) for client, payload in records)


def bundle_decode(data: _Buffer) -> Iterator[tuple[tuple[str, int], _Buffer]]:
    """Yield ``((host, port), payload)`` for each record of the bundle ``data``, in order.

    Payloads are slices of ``data`` (pass a memoryview to avoid copies). Validation is
    lazy, record by record: the records before a malformed one are yielded, then
    :class:`RelayBundleError` is raised, so a receiver keeps what arrived intact and counts
    one drop. An empty ``data`` is malformed (a bundle has at least one record).
    """
    return _records(data, decode=True)


def bundle_records(data: _Buffer) -> Iterator[tuple[_Buffer, _Buffer]]:
    """Yield ``(header, payload)`` for each record of the bundle ``data``, the 24-byte
    header left undecoded; framing is checked as :func:`bundle_decode` checks it.

    For a receiver that keeps its known clients by route key: it looks each header up as
    bytes and runs :func:`decode_header` only on the ones it does not know, instead of
    turning every record's header into address text.
    """
    return _records(data, decode=False)


def _records(data: _Buffer, *, decode: bool) -> Iterator[tuple]:
    size = len(data)
    if size == 0:
        raise RelayBundleError("empty bundle: a bundle has at least one record")
    offset = index = 0
    while offset < size:
        if size - offset < RECORD_OVERHEAD:
            raise RelayBundleError(
                f"bundle record {index} truncated: {size - offset} bytes left at offset "
                f"{offset}, a record needs at least {RECORD_OVERHEAD}",
                index,
                offset,
            )
        if data[offset] != BUNDLE_MARKER or data[offset + 1] != 0:
            raise RelayBundleError(
                f"bundle record {index} at offset {offset} starts with "
                f"{bytes(data[offset : offset + 2]).hex()}, expected {BUNDLE_MARKER:02x}00",
                index,
                offset,
            )
        start = offset + RECORD_OVERHEAD
        end = start + ((data[offset + 2] << 8) | data[offset + 3])
        if end > size:
            raise RelayBundleError(
                f"bundle record {index} at offset {offset} claims {end - start} payload bytes, "
                f"only {size - start} left",
                index,
                offset,
            )
        header = data[offset + RECORD_PREFIX_SIZE : start]
        if decode:
            try:
                header = decode_header(header)
            except RelayHeaderError as error:
                raise RelayBundleError(
                    f"bundle record {index} at offset {offset}: {error}", index, offset
                ) from None
        yield header, data[start:end]
        offset = end
        index += 1
