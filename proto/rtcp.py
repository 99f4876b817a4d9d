"""RTCP compound packets (RFC 3550 section 6), with RFC 5506 reduced-size input tolerated.

Like :mod:`.rtp`, this sees RTCP after SRTCP is removed (parsing) or before it is added
(building). A compound packet is a run of RTCP packets, each with a 4-byte header::

    byte 0   V(2)=2 P(1) count(5)   byte 1   packet type   bytes 2..3   length in 32-bit
                                                                        words, minus one

Parsed: sender and receiver reports (with their report blocks), source descriptions,
BYE. Everything else (feedback of RFC 4585 such as NACK, PLI, REMB, transport-cc; APP;
XR) is returned whole as :class:`Feedback` or :class:`UnknownPacket`, never rejected: a
browser sends them whether or not we asked. Reduced-size RTCP (RFC 5506) means a compound
packet need not start with a report nor carry a CNAME, so neither is required.

Checks: version 2 in every header, each length inside the datagram and the lengths adding
up to it exactly, padding only on the last packet and never longer than its packet, and
counts that fit their packet. :class:`RtcpError` is the only error malformed input raises.
Profile-specific extensions after the report blocks of SR/RR (RFC 3550 6.4.1) are
allowed and ignored.
"""

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "APP",
    "BYE",
    "CNAME",
    "PSFB",
    "PSFB_AFB",
    "PSFB_PLI",
    "RR",
    "RTPFB",
    "RTPFB_NACK",
    "RTPFB_TRANSPORT_CC",
    "SDES",
    "SR",
    "XR",
    "Bye",
    "Feedback",
    "ReceiverReport",
    "ReportBlock",
    "RtcpError",
    "RtcpPacket",
    "SenderReport",
    "SourceDescription",
    "UnknownPacket",
    "build_bye",
    "build_receiver_report",
    "build_sdes_cname",
    "build_sender_report",
    "is_rtcp",
    "parse_rtcp",
    "rtt_from_report_block",
    "serialize_rtcp",
]

SR: Final = 200
RR: Final = 201
SDES: Final = 202
BYE: Final = 203
APP: Final = 204
RTPFB: Final = 205
PSFB: Final = 206
XR: Final = 207

RTPFB_NACK: Final = 1
RTPFB_TRANSPORT_CC: Final = 15
PSFB_PLI: Final = 1
PSFB_AFB: Final = 15
"""Application layer feedback, which carries REMB."""

CNAME: Final = 1
"""SDES item type of the canonical name, the one item every source must send."""

_HEADER = struct.Struct("!BBH")
_SENDER_INFO = struct.Struct("!IQIII")  # SSRC of sender, NTP, RTP timestamp, packets, octets
_REPORT_BLOCK = struct.Struct("!IIIIII")  # fraction lost and cumulative lost share word 2
_TWO_SSRCS = struct.Struct("!II")
_SSRC_LISTS: Final = tuple(struct.Struct(f"!{count}I") for count in range(32))
_LOST_MIN: Final = -(1 << 23)
_LOST_MAX: Final = (1 << 23) - 1
_MAX_COUNT: Final = 31
_MAX_LENGTH_WORDS: Final = 0xFFFF

BufferLike = bytes | bytearray | memoryview


class RtcpError(ProtocolError):
    """RTCP bytes that break RFC 3550, or packet fields that cannot be encoded."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """Reception statistics about one source (RFC 3550 6.4.1).

    ``cumulative_lost`` is signed (duplicates can make it negative); ``last_sr`` is the
    middle 32 bits of the NTP time of the last SR received from the source (0: none), and
    ``delay_since_last_sr`` the time since, in 1/65536 s.
    """

    ssrc: int
    fraction_lost: int
    cumulative_lost: int
    highest_sequence: int
    jitter: int
    last_sr: int
    delay_since_last_sr: int


@dataclass(frozen=True, slots=True)
class SenderReport:
    """SR: what a sender sent, at which NTP and RTP time, plus its reception reports."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    """RR: reception reports from a participant that has not sent since the last report."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceDescription:
    """SDES: per source, a list of ``(item type, value)``; type 1 is the CNAME."""

    chunks: tuple[tuple[int, tuple[tuple[int, bytes], ...]], ...]


@dataclass(frozen=True, slots=True)
class Bye:
    """BYE: these sources are leaving, with an optional reason."""

    sources: tuple[int, ...]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Feedback:
    """An RFC 4585 feedback packet (RTPFB 205 or PSFB 206), kept whole.

    ``fmt`` picks the message (NACK, PLI, REMB, transport-cc, ...); ``fci`` is its
    feedback control information, unparsed.
    """

    packet_type: int
    fmt: int
    sender_ssrc: int
    media_ssrc: int
    fci: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownPacket:
    """Any other RTCP packet (APP, XR, ...), kept whole.

    ``fmt`` is the five-bit field of the header (a count or a subtype); ``payload`` is
    everything after the header, padding removed.
    """

    packet_type: int
    fmt: int
    payload: bytes = b""


RtcpPacket = SenderReport | ReceiverReport | SourceDescription | Bye | Feedback | UnknownPacket


def is_rtcp(data: BufferLike) -> bool:
    """Whether an RTP-range datagram is RTCP rather than RTP (RFC 5761 section 4).

    On a muxed port both start with version 2; RTCP has packet types 192..223 where RTP
    has the marker bit and payload type, which RTP avoids in that range.
    """
    return len(data) >= 2 and 192 <= data[1] <= 223


def parse_rtcp(data: BufferLike) -> list[RtcpPacket]:
    """Parse a compound RTCP packet (SRTCP already removed) into its packets, in order."""
    if type(data) is not bytes:
        data = bytes(data)  # values are kept as bytes, so copy a mutable buffer once
    total = len(data)
    if total == 0:
        raise RtcpError("RTCP packet is empty")
    packets: list[RtcpPacket] = []
    offset = 0
    while offset < total:
        if total - offset < 4:
            raise RtcpError(
                f"RTCP header truncated at offset {offset}: {total - offset} bytes left, need 4"
            )
        first, packet_type, words = _HEADER.unpack_from(data, offset)
        if first >> 6 != 2:
            raise RtcpError(
                f"RTCP packet at offset {offset} has version {first >> 6}; only version 2 exists"
            )
        start = offset + 4
        end = start + 4 * words
        if end > total:
            raise RtcpError(
                f"RTCP packet type {packet_type} at offset {offset} declares {end - offset} "
                f"bytes, but only {total - offset} remain"
            )
        body_end = end
        if first & 0x20:
            if end != total:
                raise RtcpError(
                    f"RTCP packet type {packet_type} at offset {offset} has the padding bit "
                    "set but is not the last packet of the compound packet"
                )
            padding = data[end - 1]
            if padding == 0:
                raise RtcpError("RTCP padding count is 0; it counts itself, so it is at least 1")
            if padding > end - start:
                raise RtcpError(
                    f"RTCP padding count {padding} exceeds the packet's {end - start} payload bytes"
                )
            body_end = end - padding
        count = first & 0x1F
        if packet_type == SR:
            packets.append(_parse_sender_report(data, start, body_end, count))
        elif packet_type == RR:
            packets.append(_parse_receiver_report(data, start, body_end, count))
        elif packet_type == SDES:
            packets.append(_parse_source_description(data, start, body_end, count))
        elif packet_type == BYE:
            packets.append(_parse_bye(data, start, body_end, count))
        elif packet_type in (RTPFB, PSFB):
            if body_end - start < 8:
                raise RtcpError(
                    f"RTCP feedback packet type {packet_type} needs 8 bytes of sender and "
                    f"media SSRC, has {body_end - start}"
                )
            sender_ssrc, media_ssrc = _TWO_SSRCS.unpack_from(data, start)
            packets.append(
                Feedback(packet_type, count, sender_ssrc, media_ssrc, data[start + 8 : body_end])
            )
        else:
            packets.append(UnknownPacket(packet_type, count, data[start:body_end]))
        offset = end
    return packets


def _parse_report_blocks(data: bytes, offset: int, count: int) -> tuple[ReportBlock, ...]:
    blocks = []
    for _ in range(count):
        ssrc, lost, highest, jitter, last_sr, delay = _REPORT_BLOCK.unpack_from(data, offset)
        cumulative_lost = lost & 0xFFFFFF
        if cumulative_lost & 0x800000:
            cumulative_lost -= 0x1000000
        blocks.append(
            ReportBlock(ssrc, lost >> 24, cumulative_lost, highest, jitter, last_sr, delay)
        )
        offset += 24
    return tuple(blocks)


def _parse_sender_report(data: bytes, start: int, end: int, count: int) -> SenderReport:
    need = 24 + 24 * count
    if end - start < need:
        raise RtcpError(
            f"RTCP sender report with {count} report blocks needs {need} bytes, has {end - start}"
        )
    ssrc, ntp, rtp_timestamp, packets, octets = _SENDER_INFO.unpack_from(data, start)
    reports = _parse_report_blocks(data, start + 24, count)
    return SenderReport(ssrc, ntp, rtp_timestamp, packets, octets, reports)


def _parse_receiver_report(data: bytes, start: int, end: int, count: int) -> ReceiverReport:
    need = 4 + 24 * count
    if end - start < need:
        raise RtcpError(
            f"RTCP receiver report with {count} report blocks needs {need} bytes, has {end - start}"
        )
    (ssrc,) = _SSRC_LISTS[1].unpack_from(data, start)
    return ReceiverReport(ssrc, _parse_report_blocks(data, start + 4, count))


def _parse_source_description(data: bytes, start: int, end: int, count: int) -> SourceDescription:
    chunks = []
    offset = start
    for index in range(count):
        if end - offset < 4:
            raise RtcpError(
                f"RTCP SDES chunk {index} of {count} truncated: needs a 4-byte SSRC at "
                f"offset {offset}, packet ends at {end}"
            )
        (ssrc,) = _SSRC_LISTS[1].unpack_from(data, offset)
        offset += 4
        items = []
        while True:
            if offset >= end:
                raise RtcpError(
                    f"RTCP SDES chunk {index} (SSRC {ssrc}) has no null item ending its list"
                )
            item_type = data[offset]
            if item_type == 0:
                break
            if offset + 2 > end:
                raise RtcpError(
                    f"RTCP SDES item type {item_type} at offset {offset} has no length byte"
                )
            value_start = offset + 2
            offset = value_start + data[offset + 1]
            if offset > end:
                raise RtcpError(
                    f"RTCP SDES item type {item_type} at offset {value_start - 2} runs past "
                    f"the packet end at {end}"
                )
            items.append((item_type, data[value_start:offset]))
        # The null item, then null octets to the next 32-bit boundary. Packets start on
        # 32-bit boundaries of the compound packet, so aligning the offset aligns the chunk.
        offset = (offset + 4) & ~3
        if offset > end:
            raise RtcpError(
                f"RTCP SDES chunk {index} (SSRC {ssrc}) is not padded to a 32-bit boundary"
            )
        chunks.append((ssrc, tuple(items)))
    # Some senders (aiortc) end a chunk with more null octets than needed; tolerate a tail
    # of zeros, but not other bytes beyond the chunks the count announced.
    if data.count(0, offset, end) != end - offset:
        raise RtcpError(
            f"RTCP SDES has {end - offset} bytes after its {count} chunks that are not padding"
        )
    return SourceDescription(tuple(chunks))


def _parse_bye(data: bytes, start: int, end: int, count: int) -> Bye:
    need = 4 * count
    if end - start < need:
        raise RtcpError(f"RTCP BYE with {count} sources needs {need} bytes, has {end - start}")
    sources = _SSRC_LISTS[count].unpack_from(data, start)
    offset = start + need
    reason = None
    if offset < end:
        reason_end = offset + 1 + data[offset]
        if reason_end > end:
            raise RtcpError(
                f"RTCP BYE reason of {data[offset]} bytes runs past the packet end at {end}"
            )
        # The reason is informational text for people; a bad byte is not worth the packet.
        reason = data[offset + 1 : reason_end].decode("utf-8", "replace")
    return Bye(sources, reason)


def serialize_rtcp(packets: Iterable[RtcpPacket]) -> bytes:
    """Return the compound packet of ``packets``, in order, with no padding.

    Raises :class:`RtcpError` for no packets, a field out of range, or a packet whose
    bytes are not a whole number of 32-bit words.
    """
    parts = [_serialize_one(packet) for packet in packets]
    if not parts:
        raise RtcpError("a compound RTCP packet needs at least one packet")
    return b"".join(parts)


def _serialize_one(packet: RtcpPacket) -> bytes:
    try:
        if isinstance(packet, SenderReport):
            count, packet_type = len(packet.reports), SR
            body = _SENDER_INFO.pack(
                packet.ssrc,
                packet.ntp_timestamp,
                packet.rtp_timestamp,
                packet.packet_count & 0xFFFFFFFF,
                packet.octet_count & 0xFFFFFFFF,
            ) + _serialize_report_blocks(packet.reports)
        elif isinstance(packet, ReceiverReport):
            count, packet_type = len(packet.reports), RR
            body = _SSRC_LISTS[1].pack(packet.ssrc) + _serialize_report_blocks(packet.reports)
        elif isinstance(packet, SourceDescription):
            count, packet_type = len(packet.chunks), SDES
            body = b"".join(_serialize_chunk(ssrc, items) for ssrc, items in packet.chunks)
        elif isinstance(packet, Bye):
            count, packet_type = len(packet.sources), BYE
            if count > _MAX_COUNT:
                raise RtcpError(f"RTCP BYE carries at most 31 sources, got {count}")
            body = _SSRC_LISTS[count].pack(*packet.sources)
            if packet.reason is not None:
                reason = _truncate_utf8(packet.reason, 255)
                body += _pad_to_word(bytes((len(reason),)) + reason)
        elif isinstance(packet, Feedback):
            count, packet_type = packet.fmt, packet.packet_type
            body = _TWO_SSRCS.pack(packet.sender_ssrc, packet.media_ssrc) + bytes(packet.fci)
        elif isinstance(packet, UnknownPacket):
            count, packet_type = packet.fmt, packet.packet_type
            body = bytes(packet.payload)
        else:
            raise RtcpError(f"not an RTCP packet: {packet!r}")
        if not 0 <= count <= _MAX_COUNT:
            raise RtcpError(f"RTCP count/format field must be 0..31, got {count} in {packet!r}")
        if len(body) % 4:
            raise RtcpError(
                f"RTCP packet type {packet_type} body is {len(body)} bytes, not a whole number "
                "of 32-bit words"
            )
        if len(body) // 4 > _MAX_LENGTH_WORDS:
            raise RtcpError(f"RTCP packet type {packet_type} body of {len(body)} bytes is too long")
        return _HEADER.pack(0x80 | count, packet_type, len(body) // 4) + body
    except struct.error as error:
        raise RtcpError(f"RTCP field out of range in {packet!r}: {error}") from None


def _serialize_report_blocks(blocks: Sequence[ReportBlock]) -> bytes:
    parts = []
    for block in blocks:
        if not 0 <= block.fraction_lost <= 255:
            raise RtcpError(f"report block fraction lost must be 0..255, got {block!r}")
        if not _LOST_MIN <= block.cumulative_lost <= _LOST_MAX:
            raise RtcpError(
                f"report block cumulative lost must fit 24-bit signed (clamp it), got {block!r}"
            )
        parts.append(
            _REPORT_BLOCK.pack(
                block.ssrc,
                (block.fraction_lost << 24) | (block.cumulative_lost & 0xFFFFFF),
                block.highest_sequence,
                block.jitter,
                block.last_sr,
                block.delay_since_last_sr,
            )
        )
    return b"".join(parts)


def _serialize_chunk(ssrc: int, items: Iterable[tuple[int, bytes]]) -> bytes:
    parts = [_SSRC_LISTS[1].pack(ssrc)]
    for item_type, value in items:
        if not 1 <= item_type <= 255:
            raise RtcpError(f"SDES item type must be 1..255 (0 ends the list), got {item_type}")
        if len(value) > 255:
            raise RtcpError(f"SDES item type {item_type} value is {len(value)} bytes, max 255")
        parts.append(bytes((item_type, len(value))))
        parts.append(bytes(value))
    parts.append(b"\x00")  # the null item ending the list
    return _pad_to_word(b"".join(parts))


def _pad_to_word(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _truncate_utf8(text: str, limit: int) -> bytes:
    encoded = text.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    if len(encoded) <= limit:
        return encoded
    # Cut at a character boundary: drop continuation bytes (10xxxxxx) left at the cut.
    cut = limit
    while cut and encoded[cut] & 0xC0 == 0x80:
        cut -= 1
    return encoded[:cut]


def build_sender_report(
    ssrc: int,
    ntp_timestamp: int,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: Sequence[ReportBlock] = (),
) -> bytes:
    """Return one SR packet; the 32-bit packet and octet counts wrap (taken modulo 2**32)."""
    return _serialize_one(
        SenderReport(ssrc, ntp_timestamp, rtp_timestamp, packet_count, octet_count, tuple(reports))
    )


def build_receiver_report(ssrc: int, reports: Sequence[ReportBlock] = ()) -> bytes:
    """Return one RR packet."""
    return _serialize_one(ReceiverReport(ssrc, tuple(reports)))


def build_sdes_cname(ssrc: int, cname: str | bytes) -> bytes:
    """Return one SDES packet carrying only the CNAME of ``ssrc`` (UTF-8, at most 255 bytes)."""
    try:
        value = cname.encode("utf-8") if isinstance(cname, str) else cname
    except UnicodeEncodeError:
        raise RtcpError(f"CNAME {cname!r} cannot be encoded as UTF-8") from None
    return _serialize_one(SourceDescription(((ssrc, ((CNAME, value),)),)))


def build_bye(ssrcs: Iterable[int], reason: str | None = None) -> bytes:
    """Return one BYE packet; a reason longer than 255 UTF-8 bytes is cut to fit."""
    return _serialize_one(Bye(tuple(ssrcs), reason))


def rtt_from_report_block(block: ReportBlock, arrival_ntp_middle32: int) -> float | None:
    """Return the round-trip time in seconds that a report block about our stream shows.

    RFC 3550 6.4.1: arrival time A minus LSR minus DLSR, all in 1/65536 s and modulo
    2**32. ``None`` when the peer has had no SR from us (LSR is 0). A result that comes
    out negative (the peer's delay rounding, or skewed clocks) is reported as 0.0.
    """
    if block.last_sr == 0:
        return None
    rtt = (arrival_ntp_middle32 - block.last_sr - block.delay_since_last_sr) & 0xFFFFFFFF
    if rtt & 0x80000000:
        return 0.0
    return rtt / 65536.0
