"""One WebRTC audio call as the transceiver sees it: ICE-lite, DTLS-SRTP, RTP and RTCP.

:class:`CallSession` is sans-IO, like its parts (:mod:`.ice_lite`, :mod:`.dtls`). The
transceiver feeds it every datagram of the call with the client address the relay saw
(``receive_datagram(data, addr, now)``), calls ``handle_timer(now)`` when ``get_timer()``
says, and sends what ``datagrams_to_send()`` returns, each with the client address to send
it to. The backend's audio goes in through :meth:`CallSession.send_audio`; the caller's
audio and the call's milestones come out of :meth:`CallSession.next_event`. Its DTLS-SRTP,
RTP and RTCP, which the client's side runs alike, live in :mod:`.media`.

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
from collections import Counter
from dataclasses import dataclass, replace

from voxrelay.proto.dtls import (
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
from voxrelay.proto.media import (
    OPUS_CLOCK_RATE,
    SAMPLES_PER_FRAME,
    AudioReceived,
    CallStatus,
    MediaStream,
    StreamUpdate,
)
from voxrelay.proto.rtcp import Bye
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

    @classmethod
    def after(cls, handshake: HandshakeCompleted, address: Address, elapsed: float) -> Connected:
        """The event for ``handshake``, which keyed SRTP ``elapsed`` seconds into the call."""
        return cls(
            address,
            elapsed,
            handshake.handshake_time,
            handshake.srtp_profile,
            handshake.cipher_suite.name,
        )


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str
    elapsed: float


CallEvent = IceConnected | Connected | AudioReceived | Closed


class CallSession(CallStatus):
    """The state of one call; see the module docstring for how to drive it.

    Besides the status of :class:`~voxrelay.proto.media.CallStatus` (``is_connected``,
    ``packets_sent``, ``round_trip_time``, ...) it counts dropped datagrams in ``drops``.
    """

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
        self.answer = replace(answer, sdp="", remote_candidates=())
        """The parameters the answer negotiated. Its SDP text and the offer's candidates
        are not kept (ICE-lite answers checks from any address): every call would hold
        another ~2 KiB."""
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

        self._events: list[CallEvent] = []  # a deque would hold a 64-slot block per call
        self._outgoing: list[tuple[bytes, Address]] = []
        self._closed_reason: str | None = None
        self._ice_connected = False
        # get_timer() runs after every datagram; RTP in and out never move a timer, so
        # the answer is kept until an input that may move one (everything else) comes.
        self._timer_due: float | None = None
        self._timer_stale = True
        self._media = MediaStream(
            self.dtls,
            ssrc=ssrc,
            cname=cname,
            payload_type=answer.opus_payload_type,
            drops=self.drops,
            rtcp_interval=self.settings.rtcp_interval,
            srtp_replay_window=self.settings.srtp_replay_window,
            wall_offset=wall_offset,
        )

    # ------------------------------------------------------------------ status

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
            self._timer_stale = True  # here and below: whatever may move a timer
            response = self.ice.receive_stun(data, addr, now)
            if response is not None:
                self._outgoing.append((response, addr))
            self._drain_ice(now)
        elif not self.ice.is_validated(addr):
            self.drops["unvalidated_address"] += 1
        elif 128 <= first <= 191:
            if len(data) >= 2 and 192 <= data[1] <= 223:
                self._timer_stale = True  # a BYE ends the call
                packets = self._media.receive_rtcp(data, now)
                if packets is not None and any(isinstance(p, Bye) for p in packets):
                    self._close("caller sent RTCP BYE", now, polite=False)
            elif (audio := self._media.receive_rtp(data, now)) is not None:
                self._events.append(audio)
        elif 20 <= first <= 63:
            self._timer_stale = True
            self._apply(self._media.receive_dtls(data, now), now)
        else:
            self.drops["unknown_protocol"] += 1

    def handle_timer(self, now: float) -> None:
        """Run whatever is due: consent expiry, DTLS retransmission, RTCP, setup timeout."""
        if self._closed_reason is not None:
            return
        self._timer_stale = True
        self.ice.handle_timer(now)
        self._drain_ice(now)
        if self._closed_reason is not None:
            return
        # Compared as get_timer() computes it: now - created_at can round below the timeout.
        if not self._media.is_keyed and now >= self.created_at + self.settings.setup_timeout:
            self._close("setup timeout", now, polite=False)
            return
        self._apply(self._media.handle_timer(now), now)

    def send_audio(self, payload: bytes, now: float, samples: int = SAMPLES_PER_FRAME) -> bool:
        """Send one Opus frame to the caller; False (and nothing sent) before keys exist.

        The RTP timestamp advances by ``samples`` after this frame; the marker bit is set
        on the first frame after a pause in sending, which starts a talkspurt.
        """
        if self._closed_reason is not None:
            return False
        address = self.address
        if address is None:
            return False
        packet = self._media.protect_audio(payload, now, samples)
        if packet is None:
            return False
        self._outgoing.append((packet, address))
        return True

    def close(self, now: float, reason: str = "closed by server") -> None:
        """End the call politely: RTCP BYE and DTLS close_notify when possible."""
        if self._closed_reason is None:
            self._timer_stale = True
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
        if self._timer_stale:
            self._timer_due = self._next_timer()
            self._timer_stale = False
        return self._timer_due

    def _next_timer(self) -> float | None:
        if self._closed_reason is not None:
            return None
        due = self._media.get_timer()
        ice_at = self.ice.get_timer()
        if ice_at is not None and (due is None or ice_at < due):
            due = ice_at
        if not self._media.is_keyed:
            setup_at = self.created_at + self.settings.setup_timeout
            if due is None or setup_at < due:
                due = setup_at
        return due

    def next_event(self) -> CallEvent | None:
        return self._events.pop(0) if self._events else None

    # ----------------------------------------------------------------- internals

    def _drain_ice(self, now: float) -> None:
        while (event := self.ice.next_event()) is not None:
            if isinstance(event, CandidatePairValidated | Nominated):
                if not self._ice_connected:
                    self._ice_connected = True
                    self._events.append(IceConnected(event.address, now - self.created_at))
                    if self.dtls.role is DtlsRole.CLIENT:
                        self._apply(self._media.start_handshake(now), now)
            elif isinstance(event, ConsentExpired) and not self.ice.validated_addresses:
                self._close("consent expired", now, polite=False)
                return

    def _send(self, datagrams: list[bytes]) -> None:
        """Queue ``datagrams`` to the media address; with none (consent lost), drop them."""
        address = self.address
        if address is not None:
            self._outgoing.extend([(datagram, address) for datagram in datagrams])

    def _apply(self, update: StreamUpdate, now: float) -> None:
        self._send(update.datagrams)
        if update.keyed is not None:
            address = self.address or ("", 0)
            self._events.append(Connected.after(update.keyed, address, now - self.created_at))
        if update.end_reason is not None:
            self._close(update.end_reason, now, polite=update.end_politely)

    def _close(self, reason: str, now: float, *, polite: bool) -> None:
        self._send(self._media.close(now, reason, polite=polite))
        self._closed_reason = reason
        self._events.append(Closed(reason, now - self.created_at))


def random_ssrc() -> int:
    """A random SSRC (RFC 3550 8.1): collisions are left to chance, 1 in 2**32."""
    return int.from_bytes(os.urandom(4), "big")
