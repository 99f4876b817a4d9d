"""RTP packets (RFC 3550, RFC 8285 header extensions) and receive statistics for one call.

The transceiver parses RTP only after SRTP has authenticated and decrypted it, and builds
it just before SRTP protects it, so this module sees plain RTP both ways. Even so the
parser treats its input as hostile: a peer holding the keys can send any bytes, so every
length is checked and :class:`RtpError` is the only error malformed input can raise.

Fixed header, all integers big endian (RFC 3550 section 5.1)::

    byte 0   V(2)=2 P(1) X(1) CC(4)      byte 1   M(1) PT(7)
    2..3     sequence number             4..7     timestamp
    8..11    SSRC                        12..     CC CSRC words, then the extension
                                                  (profile u16, length u16 in words, data),
                                                  the payload, and P's padding whose last
                                                  byte counts the padding, itself included

Three parts serve the hot path: :func:`build_rtp` (no extension, no CSRC: what the
transceiver sends), :func:`rtp_ssrc` and :func:`rtp_sequence` (read one field without
parsing). :class:`SequenceTracker` keeps the receive statistics of RFC 3550 Appendix A
that an RTCP receiver report carries; :class:`SenderClock`, :func:`ntp_timestamp` and
:func:`ntp_middle32` give the clock values a sender report and RTT measurement need.
"""

import math
import struct
from dataclasses import dataclass
from typing import Final

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.rtcp import ReportBlock

__all__ = [
    "HEADER_LENGTH",
    "MAX_DROPOUT",
    "MAX_MISORDER",
    "MIN_SEQUENTIAL",
    "NTP_UNIX_OFFSET",
    "ONE_BYTE_PROFILE",
    "RtpError",
    "RtpPacket",
    "SenderClock",
    "SequenceTracker",
    "build_rtp",
    "ntp_middle32",
    "ntp_timestamp",
    "parse_header_extensions",
    "parse_rtp",
    "rtp_sequence",
    "rtp_ssrc",
]

HEADER_LENGTH: Final = 12
ONE_BYTE_PROFILE: Final = 0xBEDE
"""Extension profile of RFC 8285 one-byte elements; two-byte elements use 0x1000-0x100F."""

MIN_SEQUENTIAL: Final = 2
"""Packets in sequence before a new source counts as valid (RFC 3550 A.1)."""
MAX_DROPOUT: Final = 3000
"""A forward jump shorter than this is loss, not a restart of the source (RFC 3550 A.1)."""
MAX_MISORDER: Final = 100
"""A backward step shorter than this is a late or duplicate packet (RFC 3550 A.1)."""

NTP_UNIX_OFFSET: Final = 2_208_988_800
"""Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01)."""

_SEQ_MOD: Final = 1 << 16
_FIXED = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")
_SSRC = struct.Struct("!I")
# One struct per possible CSRC count, so parsing a CSRC list is a single unpack.
_CSRC_LISTS: Final = tuple(struct.Struct(f"!{count}I") for count in range(16))
_LOST_MIN: Final = -(1 << 23)
_LOST_MAX: Final = (1 << 23) - 1

BufferLike = bytes | bytearray | memoryview


class RtpError(ProtocolError):
    """RTP bytes that break RFC 3550 or RFC 8285, or packet fields that cannot be encoded."""


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet, as parsed by :func:`parse_rtp` or to be sent with :meth:`serialize`.

    ``payload`` and ``extension_data`` are slices of the parsed buffer: ``memoryview`` when
    :func:`parse_rtp` was given a memoryview (no copy; valid while the buffer is unchanged),
    ``bytes`` otherwise. ``extension_profile`` is ``None`` when the X bit is clear.
    ``padding_size`` counts the padding bytes including the count byte; :meth:`serialize`
    writes them as zeros followed by the count.
    """

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes | memoryview = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension_data: bytes | memoryview = b""
    padding_size: int = 0

    def header_extensions(self) -> list[tuple[int, bytes]]:
        """Return the RFC 8285 elements of the header extension as ``(id, value)`` pairs."""
        if self.extension_profile is None:
            return []
        return parse_header_extensions(self.extension_profile, self.extension_data)

    def serialize(self) -> bytes:
        """Return the packet's bytes; raises :class:`RtpError` for a field out of range."""
        if not 0 <= self.payload_type <= 127:
            raise RtpError(f"RTP payload type must be 0..127, got {self.payload_type!r}")
        if len(self.csrc) > 15:
            raise RtpError(f"RTP carries at most 15 CSRCs, got {len(self.csrc)}")
        if not 0 <= self.padding_size <= 255:
            raise RtpError(f"RTP padding size must be 0..255, got {self.padding_size!r}")
        has_extension = self.extension_profile is not None
        first = (
            0x80
            | (0x20 if self.padding_size else 0)
            | (0x10 if has_extension else 0)
            | len(self.csrc)
        )
        parts: list[bytes | memoryview] = []
        try:
            parts.append(
                _FIXED.pack(
                    first,
                    (0x80 if self.marker else 0) | self.payload_type,
                    self.sequence_number,
                    self.timestamp,
                    self.ssrc,
                )
            )
            if self.csrc:
                parts.append(_CSRC_LISTS[len(self.csrc)].pack(*self.csrc))
            if has_extension:
                extension_length = len(self.extension_data)
                if extension_length % 4 or extension_length > 0xFFFF * 4:
                    raise RtpError(
                        "RTP header extension data must be a multiple of 4 bytes and at most "
                        f"{0xFFFF * 4}, got {extension_length}"
                    )
                parts.append(_EXTENSION_HEADER.pack(self.extension_profile, extension_length // 4))
                parts.append(self.extension_data)
        except struct.error as error:
            raise RtpError(f"RTP header field out of range: {error}") from None
        parts.append(self.payload)
        if self.padding_size:
            parts.append(bytes(self.padding_size - 1) + bytes((self.padding_size,)))
        return b"".join(parts)


def parse_rtp(data: BufferLike) -> RtpPacket:
    """Parse one RTP packet (SRTP already removed), checking every length it declares.

    Raises :class:`RtpError` for a version other than 2, a header shorter than its CSRC
    count and extension claim, or padding whose count is zero or longer than what follows
    the header. A ``bytearray`` is copied once; see :class:`RtpPacket` for slices.
    """
    if type(data) is bytearray:
        data = bytes(data)
    length = len(data)
    if length < HEADER_LENGTH:
        raise RtpError(f"RTP packet truncated: {length} bytes, the fixed header alone is 12")
    first, second, sequence_number, timestamp, ssrc = _FIXED.unpack_from(data)
    if first >> 6 != 2:
        raise RtpError(f"RTP version is {first >> 6}; only version 2 exists")
    offset = HEADER_LENGTH
    csrc_count = first & 0x0F
    csrc: tuple[int, ...] = ()
    if csrc_count:
        offset += 4 * csrc_count
        if offset > length:
            raise RtpError(
                f"RTP packet truncated: {csrc_count} CSRCs need {offset} header bytes, "
                f"packet has {length}"
            )
        csrc = _CSRC_LISTS[csrc_count].unpack_from(data, HEADER_LENGTH)
    extension_profile: int | None = None
    extension_data: bytes | memoryview = b""
    if first & 0x10:
        if offset + 4 > length:
            raise RtpError(
                f"RTP packet truncated: X bit set but no 4-byte extension header at offset "
                f"{offset} of {length} bytes"
            )
        extension_profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
        start = offset + 4
        offset = start + 4 * words
        if offset > length:
            raise RtpError(
                f"RTP header extension declares {words} words ({4 * words} bytes) at offset "
                f"{start}, running past the {length}-byte packet"
            )
        extension_data = data[start:offset]
    padding_size = 0
    end = length
    if first & 0x20:
        padding_size = data[length - 1]
        if padding_size == 0:
            raise RtpError("RTP padding count is 0; it counts itself, so it is at least 1")
        if padding_size > length - offset:
            raise RtpError(
                f"RTP padding count {padding_size} exceeds the {length - offset} bytes "
                "after the header"
            )
        end = length - padding_size
    return RtpPacket(
        second & 0x7F,
        sequence_number,
        timestamp,
        ssrc,
        data[offset:end],
        second >= 0x80,
        csrc,
        extension_profile,
        extension_data,
        padding_size,
    )


def parse_header_extensions(profile: int, data: BufferLike) -> list[tuple[int, bytes]]:
    """Split an RFC 8285 header extension block into ``(id, value)`` elements.

    Profile 0xBEDE holds one-byte elements (4-bit id 1..14, 4-bit length minus one);
    0x1000-0x100F holds two-byte elements (8-bit id, 8-bit length). Zero bytes between
    elements are padding. A one-byte element with id 15 (reserved) ends processing, as
    RFC 8285 section 4.2 says, and so does id 0 with a non-zero length, which is neither
    padding nor an element. Raises :class:`RtpError` for an element that runs past the
    block or for any other profile.
    """
    elements: list[tuple[int, bytes]] = []
    length = len(data)
    offset = 0
    if profile == ONE_BYTE_PROFILE:
        while offset < length:
            byte = data[offset]
            if byte == 0:
                offset += 1
                continue
            element_id = byte >> 4
            if element_id == 15 or element_id == 0:
                break
            start = offset + 1
            offset = start + (byte & 0x0F) + 1
            if offset > length:
                raise RtpError(
                    f"RTP one-byte extension element {element_id} at offset {start - 1} "
                    f"runs past the {length}-byte extension block"
                )
            elements.append((element_id, bytes(data[start:offset])))
    elif profile & 0xFFF0 == 0x1000:
        while offset < length:
            element_id = data[offset]
            if element_id == 0:
                offset += 1
                continue
            if offset + 2 > length:
                raise RtpError(
                    f"RTP two-byte extension element {element_id} at offset {offset} has "
                    "no length byte"
                )
            start = offset + 2
            offset = start + data[offset + 1]
            if offset > length:
                raise RtpError(
                    f"RTP two-byte extension element {element_id} at offset {start - 2} "
                    f"runs past the {length}-byte extension block"
                )
            elements.append((element_id, bytes(data[start:offset])))
    else:
        raise RtpError(
            f"RTP header extension profile 0x{profile:04x} is not RFC 8285 (0xbede for "
            "one-byte elements, 0x1000-0x100f for two-byte elements)"
        )
    return elements


def build_rtp(
    payload_type: int,
    sequence_number: int,
    timestamp: int,
    ssrc: int,
    payload: bytes | bytearray | memoryview,
    marker: bool = False,
) -> bytes:
    """Return a plain RTP packet with no CSRC, extension or padding: what the transceiver sends.

    Raises :class:`RtpError` for a field out of range (sequence number and timestamp are
    not wrapped here: the caller owns its counters).
    """
    # One pack and one concatenation: about 3x faster than pack_into on a bytearray that
    # then has to be copied into the bytes pylibsrtp insists on.
    if not 0 <= payload_type <= 127:
        raise RtpError(f"RTP payload type must be 0..127, got {payload_type!r}")
    try:
        header = _FIXED.pack(
            0x80, payload_type | 0x80 if marker else payload_type, sequence_number, timestamp, ssrc
        )
    except struct.error as error:
        raise RtpError(f"RTP header field out of range: {error}") from None
    return header + payload


def rtp_ssrc(data: BufferLike) -> int:
    """Return the SSRC of the RTP packet in ``data`` without parsing the rest."""
    if len(data) < HEADER_LENGTH:
        raise RtpError(f"RTP packet truncated: {len(data)} bytes, the fixed header alone is 12")
    return _SSRC.unpack_from(data, 8)[0]


def rtp_sequence(data: BufferLike) -> int:
    """Return the sequence number of the RTP packet in ``data`` without parsing the rest."""
    if len(data) < HEADER_LENGTH:
        raise RtpError(f"RTP packet truncated: {len(data)} bytes, the fixed header alone is 12")
    return (data[2] << 8) | data[3]


class SequenceTracker:
    """Receive statistics of one remote source, for the report blocks of RTCP SR and RR.

    Implements RFC 3550 Appendix A.1 (sequence validity: probation, extended sequence
    numbers, restarts), A.3 (expected, lost, fraction lost per report interval) and A.8
    (interarrival jitter). ``now`` is the arrival time in seconds on any steady clock; only
    differences matter. Two deliberate fixes to the RFC's C: sequence comparisons wrap
    modulo 2**16 even during probation, and a fraction of 256/256 is reported as 255.
    """

    __slots__ = (
        "_bad_seq",
        "_base_seq",
        "_cycles",
        "_expected_prior",
        "_heard",
        "_jitter",
        "_last_arrival",
        "_last_timestamp",
        "_max_seq",
        "_probation",
        "_received",
        "_received_prior",
        "clock_rate",
    )

    def __init__(self, clock_rate: int = 48_000) -> None:
        if clock_rate <= 0:
            raise ValueError(f"RTP clock rate must be positive, got {clock_rate!r}")
        self.clock_rate = clock_rate
        self._heard = False
        self._probation = MIN_SEQUENTIAL
        self._restart(0)

    def _restart(self, sequence_number: int) -> None:
        """RFC 3550 ``init_seq``: count the source afresh from this packet."""
        self._base_seq = sequence_number
        self._max_seq = sequence_number
        self._bad_seq = _SEQ_MOD + 1  # a value no sequence number can have
        self._cycles = 0
        self._received = 0
        self._received_prior = 0
        self._expected_prior = 0
        self._jitter = 0.0
        self._last_arrival: float | None = None
        self._last_timestamp = 0

    def update(self, sequence_number: int, rtp_timestamp: int, now: float) -> bool:
        """Account for one arriving packet; return whether it counts for this source.

        Packets are not counted while a new source is on probation, and a packet far from
        the expected sequence is not counted unless the next one follows it, which means the
        sender restarted its sequence.
        """
        seq = sequence_number & 0xFFFF
        if not self._heard:
            self._heard = True
            self._restart(seq)
            self._max_seq = (seq - 1) & 0xFFFF
            self._probation = MIN_SEQUENTIAL
        if self._probation:
            if seq == (self._max_seq + 1) & 0xFFFF:
                self._probation -= 1
                self._max_seq = seq
                if self._probation == 0:
                    self._restart(seq)
                    self._count(rtp_timestamp, now)
                    return True
            else:
                self._probation = MIN_SEQUENTIAL - 1
                self._max_seq = seq
            return False
        step = (seq - self._max_seq) & 0xFFFF
        if step < MAX_DROPOUT:
            if seq < self._max_seq:
                self._cycles += _SEQ_MOD
            self._max_seq = seq
        elif step <= _SEQ_MOD - MAX_MISORDER:
            if seq != self._bad_seq:
                self._bad_seq = (seq + 1) & 0xFFFF
                return False
            self._restart(seq)  # two packets in sequence after a jump: a new sequence
        # else: a duplicate or a late packet, counted but not moving the highest sequence
        self._count(rtp_timestamp, now)
        return True

    def _count(self, rtp_timestamp: int, now: float) -> None:
        self._received += 1
        last_arrival = self._last_arrival
        if last_arrival is not None:
            # Timestamps wrap modulo 2**32: take their difference as a signed 32-bit value.
            sent = ((rtp_timestamp - self._last_timestamp + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            difference = (now - last_arrival) * self.clock_rate - sent
            self._jitter += (abs(difference) - self._jitter) / 16
        self._last_arrival = now
        self._last_timestamp = rtp_timestamp

    @property
    def valid(self) -> bool:
        """Whether the source has passed probation, so its packets are being counted."""
        return self._heard and not self._probation

    @property
    def packets_received(self) -> int:
        """Packets counted since the source became valid (or last restarted), duplicates too."""
        return self._received

    @property
    def base_sequence(self) -> int:
        """The first sequence number counted."""
        return self._base_seq

    @property
    def cycles(self) -> int:
        """Sequence number wraparounds counted, times 65536."""
        return self._cycles

    @property
    def extended_highest_sequence(self) -> int:
        """The highest sequence number received, extended past 16 bits by the cycle count."""
        return self._cycles + self._max_seq

    @property
    def expected(self) -> int:
        """Packets expected from the base sequence up to the highest one received."""
        if not self.valid:
            return 0
        return self.extended_highest_sequence - self._base_seq + 1

    @property
    def cumulative_lost(self) -> int:
        """Expected minus received, clamped to 24-bit signed (negative after duplicates)."""
        return max(_LOST_MIN, min(_LOST_MAX, self.expected - self._received))

    @property
    def jitter(self) -> float:
        """Interarrival jitter estimate in RTP timestamp units."""
        return self._jitter

    @property
    def jitter_seconds(self) -> float:
        """Interarrival jitter estimate in seconds."""
        return self._jitter / self.clock_rate

    def report_block(self, ssrc: int, lsr: int = 0, dlsr: int = 0) -> ReportBlock:
        """Return the report block about this source and start a new report interval.

        ``lsr`` is the middle 32 bits of the NTP timestamp of the last sender report from
        the source (0 if none) and ``dlsr`` the delay since it arrived in 1/65536 s. Before
        the source passes probation nothing has been counted, and the block says so: no
        loss, no jitter.
        """
        expected = self.expected
        expected_interval = expected - self._expected_prior
        received_interval = self._received - self._received_prior
        self._expected_prior = expected
        self._received_prior = self._received
        lost_interval = expected_interval - received_interval
        fraction_lost = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction_lost = min(255, (lost_interval << 8) // expected_interval)
        return ReportBlock(
            ssrc,
            fraction_lost,
            self.cumulative_lost,
            self.extended_highest_sequence & 0xFFFFFFFF,
            min(int(self._jitter), 0xFFFFFFFF),
            lsr,
            dlsr,
        )


class SenderClock:
    """Maps a sender's clock to the RTP timeline of one outgoing stream.

    A sender report pairs an NTP wall-clock time with the RTP timestamp of the same
    instant, so the receiver can place our packets in time (lip sync, RTT). Given the
    stream's clock rate and one anchor (``start`` on the caller's clock, and the RTP
    timestamp of that instant), :meth:`rtp_timestamp` gives the timestamp for any later
    ``now`` on the same clock.
    """

    __slots__ = ("clock_rate", "start", "start_timestamp")

    def __init__(self, clock_rate: int, start: float, start_timestamp: int = 0) -> None:
        if clock_rate <= 0:
            raise ValueError(f"RTP clock rate must be positive, got {clock_rate!r}")
        self.clock_rate = clock_rate
        self.start = start
        self.start_timestamp = start_timestamp & 0xFFFFFFFF

    def rtp_timestamp(self, now: float) -> int:
        """Return the RTP timestamp at ``now``, wrapped to 32 bits."""
        ticks = round((now - self.start) * self.clock_rate)
        return (self.start_timestamp + ticks) & 0xFFFFFFFF


def ntp_timestamp(unix_seconds: float) -> int:
    """Return the 64-bit NTP timestamp (32.32 fixed point since 1900) of a Unix time.

    The seconds wrap modulo 2**32, as NTP's do on 2036-02-07 (RFC 5905 era 1).
    """
    whole = math.floor(unix_seconds)
    fraction = int((unix_seconds - whole) * 4294967296.0)
    return (((whole + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | fraction


def ntp_middle32(ntp: int) -> int:
    """Return the middle 32 bits of an NTP timestamp: the LSR form of RFC 3550 6.4.1."""
    return (ntp >> 16) & 0xFFFFFFFF
