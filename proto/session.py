"""One WebRTC audio call as the transceiver sees it: ICE-lite, DTLS-SRTP, RTP and RTCP.

:class:`CallSession` is sans-IO, like its parts (:mod:`.ice_lite`, :mod:`.dtls`). The
transceiver feeds it every datagram of the call with the client address the relay saw
(``receive_datagram(data, addr, now)``), calls ``handle_timer(now)`` when ``get_timer()``
says, and sends what ``datagrams_to_send()`` returns, each with the client address to send
it to. The backend's audio goes in through :meth:`CallSession.send_audio`; the caller's
audio and the call's milestones come out of :meth:`CallSession.next_event`.

Lifecycle, each step reported as an event::

    created --ICE check passes--> IceConnected --DTLS handshake--> Connected
        --caller audio--> AudioReceived ... --> Closed(reason)

Guarding the order (RFC 8445 7.3 and RFC 8826): DTLS and media are accepted only from an
address that passed a connectivity check and still has consent; anything else is counted
in :attr:`CallSession.drops` and dropped without a reply. SRTP keys come from the DTLS
exporter only after the peer proved it holds the certificate the offer fingerprinted.

A call ends when consent expires (no valid check for ``consent_timeout``), when it is not
connected ``setup_timeout`` seconds after the answer, when DTLS fails or is closed, when
the caller sends RTCP BYE, or when :meth:`CallSession.close` is called (WHIP DELETE,
shutdown). Closing sends close_notify and an RTCP BYE when keys exist.
"""

from __future__ import annotations

import os
import random
import struct
from collections import Counter, deque
from dataclasses import dataclass
from typing import Final

import pylibsrtp

from voxrelay.proto.dtls import (
    ApplicationData,
    ConnectionClosed,
    DtlsCertificate,
    DtlsConfiguration,
    DtlsConnection,
    DtlsRole,
    HandshakeCompleted,
    SrtpProfile,
)
from voxrelay.proto.ice_lite import (
    Address,
    CandidatePairValidated,
    ConsentExpired,
    IceLiteSession,
    Nominated,
)
from voxrelay.proto.rtcp import (
    Bye,
    ReceiverReport,
    RtcpError,
    SenderReport,
    build_bye,
    build_receiver_report,
    build_sdes_cname,
    build_sender_report,
    parse_rtcp,
    rtt_from_report_block,
)
from voxrelay.proto.rtp import SequenceTracker, ntp_middle32, ntp_timestamp
from voxrelay.proto.sdp import Answer

__all__ = [
    "OPUS_CLOCK_RATE",
    "SAMPLES_PER_FRAME",
    "AudioReceived",
    "CallEvent",
    "CallSession",
    "CallSettings",
    "Closed",
    "Connected",
    "IceConnected",
]

OPUS_CLOCK_RATE: Final = 48_000
SAMPLES_PER_FRAME: Final = 960
"""20 ms of Opus at its 48 kHz RTP clock, the frame size WebRTC uses."""

_RTP_HEADER: Final = struct.Struct("!BBHII")
_SRTP_POLICY: Final = {
    SrtpProfile.AES128_CM_HMAC_SHA1_80: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    SrtpProfile.AES128_CM_HMAC_SHA1_32: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    SrtpProfile.AEAD_AES_128_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    SrtpProfile.AEAD_AES_256_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}
# A gap this long in what we send starts a new talkspurt: set the RTP marker bit.
_TALKSPURT_GAP: Final = 0.06


@dataclass(frozen=True, slots=True)
class CallSettings:
    """Timeouts and intervals of a call; the defaults suit browsers."""

    consent_timeout: float = 30.0
    setup_timeout: float = 20.0
    rtcp_interval: float = 5.0
    """Mean seconds between our RTCP reports (RFC 3550 6.2; randomised 0.5x-1.5x)."""
    srtp_replay_window: int = 1024


@dataclass(frozen=True, slots=True)
class IceConnected:
    """The first connectivity check passed; DTLS may start."""

    address: Address
    elapsed: float
    """Seconds since the session was created (the answer was sent)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """DTLS finished and SRTP is keyed: audio can flow both ways."""

    address: Address
    elapsed: float
    handshake_time: float
    srtp_profile: SrtpProfile | None
    cipher_suite: str


@dataclass(frozen=True, slots=True)
class AudioReceived:
    """One decrypted RTP packet of the caller's audio."""

    payload: bytes
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool
    arrival: float


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str
    elapsed: float


CallEvent = IceConnected | Connected | AudioReceived | Closed


class CallSession:
    """The state of one call; see the module docstring for how to drive it."""

    def __init__(
        self,
        answer: Answer,
        certificate: DtlsCertificate,
        *,
        ssrc: int,
        cname: str,
        now: float,
        settings: CallSettings | None = None,
        dtls_configuration: DtlsConfiguration | None = None,
        wall_offset: float = 0.0,
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time (RTCP sender reports carry NTP
        wall-clock time, and proto/ never reads a clock itself)."""
        self.settings = settings or CallSettings()
        self._wall_offset = wall_offset
        self.answer = answer
        self.ssrc = ssrc
        self.cname = cname
        self.created_at = now
        self.ice = IceLiteSession(
            answer.ice_ufrag,
            answer.ice_pwd,
            answer.remote_ice_ufrag,
            answer.remote_ice_pwd,
            consent_timeout=self.settings.consent_timeout,
        )
        role = DtlsRole.SERVER if answer.dtls_role == "server" else DtlsRole.CLIENT
        self.dtls = DtlsConnection(
            role,
            certificate,
            expected_remote_fingerprint=[
                (fingerprint.algorithm, fingerprint.value)
                for fingerprint in answer.remote_fingerprints
            ],
            configuration=dtls_configuration,
        )
        self.drops: Counter[str] = Counter()
        """Datagrams dropped, by reason (for metrics and tests)."""
        self.packets_received = 0
        self.packets_sent = 0
        self.octets_sent = 0
        self.round_trip_time: float | None = None
        """Latest RTT from the caller's RTCP receiver reports (RFC 3550 6.4.1)."""

        self._events: deque[CallEvent] = deque()
        self._outgoing: list[tuple[bytes, Address]] = []
        self._closed_reason: str | None = None
        self._ice_connected = False
        self._tx: pylibsrtp.Session | None = None
        self._rx: pylibsrtp.Session | None = None
        self._rtcp_rsize = answer.rtcp_rsize
        self._payload_type = answer.opus_payload_type
        # Outbound RTP state; random starts as RFC 3550 5.1 asks.
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self._last_send_at: float | None = None
        self._last_samples = 0
        # Inbound statistics, per caller SSRC (normally one).
        self._trackers: dict[int, SequenceTracker] = {}
        self._last_sr: dict[int, tuple[int, float]] = {}  # ssrc -> (LSR middle32, arrival)
        self._next_rtcp_at: float | None = None

    # ------------------------------------------------------------------ status

    @property
    def is_connected(self) -> bool:
        return self._tx is not None and self._closed_reason is None

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    @property
    def address(self) -> Address | None:
        """Where media goes: the nominated address, else the latest validated one."""
        selected = self.ice.selected_address
        if selected is not None:
            return selected
        validated = self.ice.validated_addresses
        return validated[-1] if validated else None

    # ------------------------------------------------------------------ inputs

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one datagram of this call from client address ``addr``."""
        if self._closed_reason is not None or not data:
            self.drops["closed" if data else "empty"] += 1
            return
        first = data[0]
        if first <= 3:
            response = self.ice.receive_stun(data, addr, now)
            if response is not None:
                self._outgoing.append((response, addr))
            self._drain_ice(now)
        elif not self.ice.is_validated(addr):
            self.drops["unvalidated_address"] += 1
        elif 128 <= first <= 191:
            if len(data) >= 2 and 192 <= data[1] <= 223:
                self._receive_rtcp(data, now)
            else:
                self._receive_rtp(data, addr, now)
        elif 20 <= first <= 63:
            self.dtls.receive_datagram(data, now)
            self._drain_dtls(now)
        else:
            self.drops["unknown_protocol"] += 1

    def handle_timer(self, now: float) -> None:
        """Run whatever is due: consent expiry, DTLS retransmission, RTCP, setup timeout."""
        if self._closed_reason is not None:
            return
        self.ice.handle_timer(now)
        self._drain_ice(now)
        if self._closed_reason is not None:
            return
        # Compared as get_timer() computes it: now - created_at can round below the timeout.
        if self._tx is None and now >= self.created_at + self.settings.setup_timeout:
            self._close("setup timeout", now, polite=False)
            return
        timer = self.dtls.get_timer()
        if timer is not None and timer <= now:
            self.dtls.handle_timer(now)
            self._drain_dtls(now)
        if self._next_rtcp_at is not None and now >= self._next_rtcp_at:
            self._send_rtcp_report(now)

    def send_audio(self, payload: bytes, now: float, samples: int = SAMPLES_PER_FRAME) -> bool:
        """Send one Opus frame to the caller; False (and nothing sent) before keys exist.

        The RTP timestamp advances by ``samples`` after this frame; the marker bit is set
        on the first frame after a pause in sending, which starts a talkspurt.
        """
        tx = self._tx
        address = self.address
        if tx is None or address is None or self._closed_reason is not None:
            return False
        last = self._last_send_at
        marker = last is None or now - last > _TALKSPURT_GAP
        if marker and last is not None:
            # A new talkspurt: stamp it with the time that really passed since the last
            # frame (RFC 3550 5.1: the timestamp is the sampling instant).
            elapsed = int((now - last) * OPUS_CLOCK_RATE) - self._last_samples
            if elapsed > 0:
                self._timestamp = (self._timestamp + elapsed) & 0xFFFFFFFF
        self._last_send_at = now
        self._last_samples = samples
        header = _RTP_HEADER.pack(
            0x80,
            (0x80 if marker else 0) | self._payload_type,
            self._sequence,
            self._timestamp,
            self.ssrc,
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._timestamp = (self._timestamp + samples) & 0xFFFFFFFF
        try:
            packet = tx.protect(header + payload)
        except pylibsrtp.Error:
            self.drops["srtp_protect_failed"] += 1
            return False
        self.packets_sent += 1
        self.octets_sent += len(payload)
        self._outgoing.append((packet, address))
        return True

    def close(self, now: float, reason: str = "closed by server") -> None:
        """End the call politely: RTCP BYE and DTLS close_notify when possible."""
        if self._closed_reason is None:
            self._close(reason, now, polite=True)

    # ----------------------------------------------------------------- outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Return and forget the datagrams to send, each with its client address."""
        if not self._outgoing:
            return []
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None once closed."""
        if self._closed_reason is not None:
            return None
        candidates = [self.ice.get_timer(), self.dtls.get_timer(), self._next_rtcp_at]
        if self._tx is None:
            candidates.append(self.created_at + self.settings.setup_timeout)
        due = [t for t in candidates if t is not None]
        return min(due) if due else None

    def next_event(self) -> CallEvent | None:
        return self._events.popleft() if self._events else None

    # ----------------------------------------------------------------- internals

    def _drain_ice(self, now: float) -> None:
        while (event := self.ice.next_event()) is not None:
            if isinstance(event, CandidatePairValidated | Nominated):
                if not self._ice_connected:
                    self._ice_connected = True
                    self._events.append(IceConnected(event.address, now - self.created_at))
                    if self.dtls.role is DtlsRole.CLIENT:
                        self.dtls.start_handshake(now)
                        self._drain_dtls(now)
            elif isinstance(event, ConsentExpired) and not self.ice.validated_addresses:
                self._close("consent expired", now, polite=False)
                return

    def _drain_dtls(self, now: float) -> None:
        address = self.address
        for datagram in self.dtls.datagrams_to_send(now):
            if address is not None:
                self._outgoing.append((datagram, address))
        while (event := self.dtls.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self._key_srtp(event, now)
            elif isinstance(event, ApplicationData):
                self.drops["dtls_application_data"] += 1  # no data channels here
            elif isinstance(event, ConnectionClosed):
                reason = "dtls closed by peer" if event.by_peer else f"dtls failed: {event.reason}"
                self._close(reason, now, polite=False)
                return

    def _key_srtp(self, event: HandshakeCompleted, now: float) -> None:
        if event.srtp_profile is None:
            self._close("dtls negotiated no SRTP profile", now, polite=True)
            return
        profile = _SRTP_POLICY[event.srtp_profile]
        outbound = pylibsrtp.Policy(
            key=event.local_srtp_key + event.local_srtp_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile,
        )
        inbound = pylibsrtp.Policy(
            key=event.remote_srtp_key + event.remote_srtp_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile,
        )
        inbound.window_size = self.settings.srtp_replay_window
        self._tx = pylibsrtp.Session(outbound)
        self._rx = pylibsrtp.Session(inbound)
        self._schedule_rtcp(now)
        self._events.append(
            Connected(
                self.address or ("", 0),
                now - self.created_at,
                event.handshake_time,
                event.srtp_profile,
                event.cipher_suite.name,
            )
        )

    def _receive_rtp(self, data: bytes, addr: Address, now: float) -> None:
        rx = self._rx
        if rx is None:
            self.drops["media_before_keys"] += 1
            return
        try:
            plain = rx.unprotect(data)
        except pylibsrtp.Error:
            self.drops["srtp_auth_failed"] += 1
            return
        if len(plain) < 12:
            self.drops["rtp_malformed"] += 1
            return
        first, second, sequence, timestamp, ssrc = _RTP_HEADER.unpack_from(plain)
        offset = 12 + 4 * (first & 0x0F)
        if first & 0x10:  # header extension: 4-byte header then length words
            if len(plain) < offset + 4:
                self.drops["rtp_malformed"] += 1
                return
            offset += 4 + 4 * int.from_bytes(plain[offset + 2 : offset + 4], "big")
        end = len(plain)
        if first & 0x20:  # padding: the last byte counts it
            end -= plain[-1]
        if offset > end or (first & 0x20 and plain[-1] == 0):
            self.drops["rtp_malformed"] += 1
            return
        tracker = self._trackers.get(ssrc)
        if tracker is None:
            if len(self._trackers) >= 4:
                self.drops["rtp_too_many_sources"] += 1
                return
            tracker = self._trackers[ssrc] = SequenceTracker(OPUS_CLOCK_RATE)
        tracker.update(sequence, timestamp, now)
        self.packets_received += 1
        self._events.append(
            AudioReceived(
                plain[offset:end],
                second & 0x7F,
                sequence,
                timestamp,
                ssrc,
                bool(second & 0x80),
                now,
            )
        )

    def _receive_rtcp(self, data: bytes, now: float) -> None:
        rx = self._rx
        if rx is None:
            self.drops["media_before_keys"] += 1
            return
        try:
            plain = rx.unprotect_rtcp(data)
            packets = parse_rtcp(plain)
        except pylibsrtp.Error:
            self.drops["srtcp_auth_failed"] += 1
            return
        except RtcpError:
            self.drops["rtcp_malformed"] += 1
            return
        arrival_middle = ntp_middle32(ntp_timestamp(now + self._wall_offset))
        for packet in packets:
            if isinstance(packet, SenderReport):
                self._last_sr[packet.ssrc] = ((packet.ntp_timestamp >> 16) & 0xFFFFFFFF, now)
            if isinstance(packet, SenderReport | ReceiverReport):
                for block in packet.reports:
                    if block.ssrc == self.ssrc:
                        rtt = rtt_from_report_block(block, arrival_middle)
                        if rtt is not None and rtt >= 0:
                            self.round_trip_time = rtt
            elif isinstance(packet, Bye):
                self._close("caller sent RTCP BYE", now, polite=False)
                return

    def _schedule_rtcp(self, now: float) -> None:
        self._next_rtcp_at = now + self.settings.rtcp_interval * random.uniform(0.5, 1.5)

    def _report_blocks(self, now: float) -> list:
        blocks = []
        for ssrc, tracker in self._trackers.items():
            lsr, delay = 0, 0
            if ssrc in self._last_sr:
                lsr, received_at = self._last_sr[ssrc]
                delay = int((now - received_at) * 65536) & 0xFFFFFFFF
            blocks.append(tracker.report_block(ssrc, lsr, delay))
        return blocks

    def _rtcp_compound(self, now: float) -> bytes:
        blocks = self._report_blocks(now)
        if self.packets_sent:
            report = build_sender_report(
                self.ssrc,
                ntp_timestamp(now + self._wall_offset),
                self._timestamp,
                self.packets_sent,
                self.octets_sent,
                blocks,
            )
        else:
            report = build_receiver_report(self.ssrc, blocks)
        return report + build_sdes_cname(self.ssrc, self.cname)

    def _send_rtcp_report(self, now: float) -> None:
        self._schedule_rtcp(now)
        self._send_rtcp(self._rtcp_compound(now))

    def _send_rtcp(self, plain: bytes) -> None:
        address = self.address
        if self._tx is None or address is None:
            return
        try:
            self._outgoing.append((self._tx.protect_rtcp(plain), address))
        except pylibsrtp.Error:
            self.drops["srtp_protect_failed"] += 1

    def _close(self, reason: str, now: float, *, polite: bool) -> None:
        if polite and self._tx is not None:
            self._send_rtcp(self._rtcp_compound(now) + build_bye([self.ssrc], reason[:255]))
        if polite and not self.dtls.is_closed:
            self.dtls.close(now)
            address = self.address
            for datagram in self.dtls.datagrams_to_send(now):
                if address is not None:
                    self._outgoing.append((datagram, address))
        self._closed_reason = reason
        self._next_rtcp_at = None
        self._events.append(Closed(reason, now - self.created_at))


def random_ssrc() -> int:
    """A random SSRC (RFC 3550 8.1): collisions are left to chance, 1 in 2**32."""
    return int.from_bytes(os.urandom(4), "big")
