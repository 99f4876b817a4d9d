"""The secure audio of one WebRTC call, as both of its ends run it: DTLS-SRTP, RTP and RTCP.

:class:`MediaStream` is what :class:`~voxrelay.proto.session.CallSession` (the
transceiver's side) and :class:`~voxrelay.proto.caller.CallerSession` (the client's side)
have in common once ICE has found the path. Given the call's DTLS connection it keys
SRTP from the handshake (RFC 5764), numbers and protects our Opus frames (RFC 3550 5.1,
a new talkspurt after a pause), unprotects and parses the peer's with reception
statistics per source, and writes and reads the RTCP that measures round trip (RFC 3550
6.4). What differs between the two ends (ICE, where datagrams go, which events they
report) stays in the sessions.

Sans-IO and address-free: every input takes ``now`` and returns what to send as bytes,
which the session sends wherever its ICE says. DTLS progress comes back as a
:class:`StreamUpdate` (datagrams, SRTP just keyed, or why the call must end); the hot
paths, :meth:`MediaStream.protect_audio` and :meth:`MediaStream.receive_rtp`, return just
the packet or the event. Datagrams that cannot be used are counted in the session's
``drops`` by reason, never raised.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import pylibsrtp

from voxrelay.proto.dtls import (
    ApplicationData,
    ConnectionClosed,
    DtlsConnection,
    HandshakeCompleted,
    SrtpProfile,
)
from voxrelay.proto.rtcp import (
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpError,
    RtcpPacket,
    SenderReport,
    build_bye,
    build_receiver_report,
    build_sdes_cname,
    build_sender_report,
    parse_rtcp,
    rtt_from_report_block,
)
from voxrelay.proto.rtp import SequenceTracker, ntp_middle32, ntp_timestamp
from voxrelay.proto.srtp import SrtpContext

__all__ = [
    "MAX_REMOTE_SOURCES",
    "OPUS_CLOCK_RATE",
    "SAMPLES_PER_FRAME",
    "TALKSPURT_GAP",
    "AudioReceived",
    "CallStatus",
    "MediaStream",
    "StreamUpdate",
]

OPUS_CLOCK_RATE: Final = 48_000
SAMPLES_PER_FRAME: Final = 960
"""20 ms of Opus at its 48 kHz RTP clock, the frame size WebRTC uses."""
TALKSPURT_GAP: Final = 0.06
"""A pause this long (seconds) in what we send starts a new talkspurt: the RTP marker bit."""
MAX_REMOTE_SOURCES: Final = 4
"""Peer SSRCs we keep statistics for; packets of more are dropped (a call has one)."""

_RTP_HEADER: Final = struct.Struct("!BBHII")
_SRTP_POLICY: Final = {
    SrtpProfile.AES128_CM_HMAC_SHA1_80: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    SrtpProfile.AES128_CM_HMAC_SHA1_32: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    SrtpProfile.AEAD_AES_128_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    SrtpProfile.AEAD_AES_256_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}


@dataclass(slots=True)
class AudioReceived:
    """One decrypted RTP packet of the peer's audio.

    Not frozen, unlike the other events: one is made for every packet of every call, and
    a frozen dataclass's ``__init__`` costs five times as much. Treat it as read-only.
    """

    payload: bytes
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool
    arrival: float


@dataclass(slots=True)
class StreamUpdate:
    """What DTLS progress asks of the session: send ``datagrams``, then report ``keyed``
    (SRTP keys exist from now on), then end the call if ``end_reason`` is set."""

    datagrams: list[bytes] = field(default_factory=list)
    keyed: HandshakeCompleted | None = None
    end_reason: str | None = None
    end_politely: bool = False
    """Say goodbye (RTCP BYE, close_notify) when ending: DTLS itself still works."""


class MediaStream:
    """SRTP, RTP and RTCP of one call's audio; see the module docstring.

    ``dtls`` may be attached later (a caller learns its DTLS role from the answer); the
    DTLS methods need it. ``drops`` is the owning session's counter, shared so that one
    counter tells every reason a datagram was dropped.
    """

    def __init__(
        self,
        dtls: DtlsConnection | None,
        *,
        ssrc: int,
        cname: str,
        payload_type: int,
        drops: Counter[str],
        rtcp_interval: float = 5.0,
        srtp_replay_window: int = 1024,
        wall_offset: float = 0.0,
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time: RTCP carries NTP wall-clock time."""
        self.dtls = dtls
        self.ssrc = ssrc
        self.cname = cname
        self.payload_type = payload_type
        self.drops = drops
        self.rtcp_interval = rtcp_interval
        """Mean seconds between our RTCP reports (RFC 3550 6.2; randomised 0.5x-1.5x)."""
        self.srtp_replay_window = srtp_replay_window
        self.wall_offset = wall_offset
        self.packets_sent = 0
        self.octets_sent = 0
        self.packets_received = 0
        self.round_trip_time: float | None = None
        """Latest RTT from the peer's RTCP reports about our stream (RFC 3550 6.4.1)."""
        self.next_rtcp_at: float | None = None

        self._tx: SrtpContext | None = None
        self._rx: SrtpContext | None = None
        # Outbound RTP state; random starts as RFC 3550 5.1 asks.
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        """The RTP timestamp of the next frame, if it follows without a pause."""
        self._last_send_at: float | None = None
        self._last_samples = 0
        # Inbound statistics per peer SSRC, and the last SR of each: (LSR middle32, arrival).
        self._trackers: dict[int, SequenceTracker] = {}
        self._last_sr: dict[int, tuple[int, float]] = {}

    @property
    def is_keyed(self) -> bool:
        """SRTP keys exist: audio can be protected and unprotected."""
        return self._tx is not None

    # ------------------------------------------------------------------- DTLS

    def start_handshake(self, now: float) -> StreamUpdate:
        """Send the first flight (we are the DTLS client)."""
        assert self.dtls is not None
        self.dtls.start_handshake(now)
        return self.drain_dtls(now)

    def receive_dtls(self, data: bytes, now: float) -> StreamUpdate:
        assert self.dtls is not None
        self.dtls.receive_datagram(data, now)
        return self.drain_dtls(now)

    def key_srtp(self, handshake: HandshakeCompleted, now: float) -> bool:
        """Key SRTP both ways from a handshake's exporter keys and schedule our first
        report; False (nothing keyed) when the handshake negotiated no SRTP profile.

        :meth:`drain_dtls` calls this; it is public for a DTLS the stream does not own.
        """
        if handshake.srtp_profile is None:
            return False
        profile = _SRTP_POLICY[handshake.srtp_profile]
        outbound = pylibsrtp.Policy(
            key=handshake.local_srtp_key + handshake.local_srtp_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile,
        )
        inbound = pylibsrtp.Policy(
            key=handshake.remote_srtp_key + handshake.remote_srtp_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile,
        )
        inbound.window_size = self.srtp_replay_window
        self._tx = SrtpContext(outbound)
        self._rx = SrtpContext(inbound)
        self._schedule_rtcp(now)
        return True

    def drain_dtls(self, now: float) -> StreamUpdate:
        """Collect what DTLS wants sent and act on its events: key SRTP on completion."""
        dtls = self.dtls
        assert dtls is not None
        update = StreamUpdate(dtls.datagrams_to_send(now))
        while (event := dtls.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                if not self.key_srtp(event, now):
                    update.end_reason = "dtls negotiated no SRTP profile"
                    update.end_politely = True
                    return update
                update.keyed = event
            elif isinstance(event, ApplicationData):
                self.drops["dtls_application_data"] += 1  # no data channels here
            elif isinstance(event, ConnectionClosed):
                update.end_reason = (
                    "dtls closed by peer" if event.by_peer else f"dtls failed: {event.reason}"
                )
                return update
        return update

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due: DTLS retransmission or our next report."""
        dtls_at = self.dtls.get_timer() if self.dtls is not None else None
        rtcp_at = self.next_rtcp_at
        if dtls_at is None or (rtcp_at is not None and rtcp_at < dtls_at):
            return rtcp_at
        return dtls_at

    def handle_timer(self, now: float) -> StreamUpdate:
        """Retransmit DTLS if due, then send an RTCP report if due."""
        update = StreamUpdate()
        dtls = self.dtls
        if dtls is not None and (timer := dtls.get_timer()) is not None and timer <= now:
            dtls.handle_timer(now)
            update = self.drain_dtls(now)
            if update.end_reason is not None:
                return update
        if self.next_rtcp_at is not None and now >= self.next_rtcp_at:
            self._schedule_rtcp(now)
            report = self._protect_rtcp(self._rtcp_compound(now))
            if report is not None:
                update.datagrams.append(report)
        return update

    def close(self, now: float, reason: str, *, polite: bool) -> list[bytes]:
        """Stop reporting; when ``polite``, return an RTCP BYE (once keyed) and close_notify."""
        self.next_rtcp_at = None
        goodbye: list[bytes] = []
        if polite and self._tx is not None:
            bye = self._protect_rtcp(
                self._rtcp_compound(now) + build_bye([self.ssrc], reason[:255])
            )
            if bye is not None:
                goodbye.append(bye)
        dtls = self.dtls
        if polite and dtls is not None and not dtls.is_closed:
            dtls.close(now)
            goodbye.extend(dtls.datagrams_to_send(now))
        return goodbye

    # -------------------------------------------------------------------- RTP

    def protect_audio(
        self, payload: bytes, now: float, samples: int = SAMPLES_PER_FRAME
    ) -> bytes | None:
        """Return one Opus frame as an SRTP packet; None before keys exist (nothing changes)
        or when SRTP refuses to protect it (counted in ``drops``).

        The RTP timestamp advances by ``samples`` after this frame; the marker bit is set
        on the first frame after a pause in sending, which starts a talkspurt.
        """
        tx = self._tx
        if tx is None:
            return None
        last = self._last_send_at
        marker = last is None or now - last > TALKSPURT_GAP
        if marker and last is not None:
            # A new talkspurt: stamp it with the time that really passed since the last
            # frame (RFC 3550 5.1: the timestamp is the sampling instant).
            elapsed = int((now - last) * OPUS_CLOCK_RATE) - self._last_samples
            if elapsed > 0:
                self._timestamp = (self._timestamp + elapsed) & 0xFFFFFFFF
        self._last_send_at = now
        self._last_samples = samples
        timestamp = self._timestamp
        header = _RTP_HEADER.pack(
            0x80,
            (0x80 | self.payload_type) if marker else self.payload_type,
            self._sequence,
            timestamp,
            self.ssrc,
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._timestamp = (timestamp + samples) & 0xFFFFFFFF
        try:
            packet = tx.protect(header + payload)
        except pylibsrtp.Error:
            self.drops["srtp_protect_failed"] += 1
            return None
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return packet

    def receive_rtp(self, data: bytes, now: float) -> AudioReceived | None:
        """Unprotect and parse one SRTP packet of the peer; None when it was dropped.

        Parses as :func:`~voxrelay.proto.rtp.parse_rtp` does, rejecting the same packets,
        without building an ``RtpPacket``: this runs for every packet of every call.
        """
        rx = self._rx
        if rx is None:
            self.drops["media_before_keys"] += 1
            return None
        try:
            plain = rx.unprotect(data)
        except pylibsrtp.Error:
            self.drops["srtp_auth_failed"] += 1
            return None
        if len(plain) < 12:
            self.drops["rtp_malformed"] += 1
            return None
        first, second, sequence, timestamp, ssrc = _RTP_HEADER.unpack_from(plain)
        offset = 12 + 4 * (first & 0x0F)
        if first & 0x10:  # header extension: 4-byte header then length words
            if len(plain) < offset + 4:
                self.drops["rtp_malformed"] += 1
                return None
            offset += 4 + 4 * int.from_bytes(plain[offset + 2 : offset + 4], "big")
        end = len(plain)
        if first & 0x20:  # padding: the last byte counts it, itself included
            end -= plain[-1]
        if offset > end or (first & 0x20 and plain[-1] == 0) or first & 0xC0 != 0x80:
            self.drops["rtp_malformed"] += 1
            return None
        tracker = self._trackers.get(ssrc)
        if tracker is None:
            if len(self._trackers) >= MAX_REMOTE_SOURCES:
                self.drops["rtp_too_many_sources"] += 1
                return None
            tracker = self._trackers[ssrc] = SequenceTracker(OPUS_CLOCK_RATE)
        tracker.update(sequence, timestamp, now)
        self.packets_received += 1
        return AudioReceived(
            plain[offset:end], second & 0x7F, sequence, timestamp, ssrc, second >= 0x80, now
        )

    def rtp_timestamp_at(self, now: float) -> int:
        """Our RTP clock at ``now``, which an SR pairs with the NTP time (RFC 3550 6.4.1)."""
        if self._last_send_at is None:
            return self._timestamp
        last_frame = self._timestamp - self._last_samples
        return (last_frame + int((now - self._last_send_at) * OPUS_CLOCK_RATE)) & 0xFFFFFFFF

    # ------------------------------------------------------------------- RTCP

    def receive_rtcp(self, data: bytes, now: float) -> list[RtcpPacket] | None:
        """Unprotect and parse one SRTCP compound; None when it was dropped.

        Notes each SR (for the LSR/DLSR of our reports) and takes the round trip from report
        blocks about our SSRC, up to a BYE; the session decides what a BYE means.
        """
        rx = self._rx
        if rx is None:
            self.drops["media_before_keys"] += 1
            return None
        try:
            packets = parse_rtcp(rx.unprotect_rtcp(data))
        except pylibsrtp.Error:
            self.drops["srtcp_auth_failed"] += 1
            return None
        except RtcpError:
            self.drops["rtcp_malformed"] += 1
            return None
        arrival_middle = ntp_middle32(ntp_timestamp(now + self.wall_offset))
        for packet in packets:
            if isinstance(packet, SenderReport) and (
                packet.ssrc in self._last_sr or len(self._last_sr) < MAX_REMOTE_SOURCES
            ):
                # Bounded like the RTP sources: an authenticated peer cycling SSRCs in
                # sender reports must not grow this without end.
                self._last_sr[packet.ssrc] = (ntp_middle32(packet.ntp_timestamp), now)
            if isinstance(packet, SenderReport | ReceiverReport):
                for block in packet.reports:
                    if block.ssrc == self.ssrc:
                        rtt = rtt_from_report_block(block, arrival_middle)
                        if rtt is not None:
                            self.round_trip_time = rtt
            elif isinstance(packet, Bye):
                break
        return packets

    def _rtcp_compound(self, now: float) -> bytes:
        """SR (once we sent audio) or RR, with a block per peer source, then SDES CNAME."""
        blocks: list[ReportBlock] = []
        for ssrc, tracker in self._trackers.items():
            lsr, delay = 0, 0
            if ssrc in self._last_sr:
                lsr, received_at = self._last_sr[ssrc]
                delay = int((now - received_at) * 65536) & 0xFFFFFFFF
            blocks.append(tracker.report_block(ssrc, lsr, delay))
        if self.packets_sent:
            report = build_sender_report(
                self.ssrc,
                ntp_timestamp(now + self.wall_offset),
                self.rtp_timestamp_at(now),
                self.packets_sent,
                self.octets_sent,
                blocks,
            )
        else:
            report = build_receiver_report(self.ssrc, blocks)
        return report + build_sdes_cname(self.ssrc, self.cname)

    def _protect_rtcp(self, plain: bytes) -> bytes | None:
        assert self._tx is not None
        try:
            return self._tx.protect_rtcp(plain)
        except pylibsrtp.Error:
            self.drops["srtp_protect_failed"] += 1
            return None

    def _schedule_rtcp(self, now: float) -> None:
        self.next_rtcp_at = now + self.rtcp_interval * random.uniform(0.5, 1.5)


class CallStatus:
    """Status and counters that both ends of a call expose, read from their stream.

    Mixed into the session classes, which set ``_media`` and ``_closed_reason``.
    """

    _media: MediaStream
    _closed_reason: str | None

    @property
    def is_connected(self) -> bool:
        """SRTP is keyed and the call is not closed: audio flows both ways."""
        return self._media.is_keyed and self._closed_reason is None

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    @property
    def packets_sent(self) -> int:
        return self._media.packets_sent

    @property
    def octets_sent(self) -> int:
        """Payload octets sent (RFC 3550 6.4.1's sender octet count)."""
        return self._media.octets_sent

    @property
    def packets_received(self) -> int:
        return self._media.packets_received

    @property
    def round_trip_time(self) -> float | None:
        """Latest RTT from the peer's RTCP reports about our stream (RFC 3550 6.4.1)."""
        return self._media.round_trip_time
