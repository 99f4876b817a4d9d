"""The calling side of one WebRTC audio call, sans-IO: what a browser does, minus the browser.

:class:`CallerSession` offers audio, takes the answer, and then runs the client's half of
the call against an ICE-lite peer such as a voxrelay transceiver: a full ICE controlling
agent with one candidate pair (RFC 8445), DTLS-SRTP in whichever role the answer leaves
it (RFC 5763), Opus RTP out and in, and enough RTCP for both sides to measure round trip.
It exists so that a load generator can run hundreds of calls in one process on one
socket, which aiortc (a socket and several tasks per call) cannot.

Like :class:`~voxrelay.proto.session.CallSession` it owns no socket and reads no clock, and
its DTLS-SRTP, RTP and RTCP are the same :class:`~voxrelay.proto.media.MediaStream`.
Drive it with::

    caller = CallerSession(certificate, now=now)
    answer = signal(caller.offer_sdp(local_ip, local_port))   # e.g. a WHIP POST
    caller.accept_answer(answer, now)
    # then, in a loop: send caller.datagrams_to_send() to caller.remote_address,
    # feed replies to caller.receive_datagram(data, now), call caller.handle_timer(now)
    # when caller.get_timer() is due, and read caller.next_event()

ICE, minimal on purpose: the one remote candidate of the answer is checked from the one
local address, with USE-CANDIDATE on the first check (the peer is controlled). A check is
retransmitted with doubling intervals (50 ms, 100 ms, ... capped) until a success response
signed with the peer's ice-pwd arrives; then consent checks (RFC 7675) follow every
``consent_interval`` seconds, and the call closes with "consent expired" when no valid
response came for ``consent_timeout`` seconds. Binding requests from the peer are not
answered, so the peer must be ICE-lite.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal

from aioice import stun as aioice_stun

from voxrelay.proto.dtls import (
    DtlsCertificate,
    DtlsConfiguration,
    DtlsConnection,
    DtlsRole,
)
from voxrelay.proto.ice_lite import Address
from voxrelay.proto.media import (
    SAMPLES_PER_FRAME,
    AudioReceived,
    CallStatus,
    MediaStream,
    StreamUpdate,
)
from voxrelay.proto.rtcp import Bye, RtcpPacket
from voxrelay.proto.sdp import SdpError, generate_ice_pwd, parse_offer
from voxrelay.proto.session import Closed, Connected

__all__ = [
    "OPUS_PAYLOAD_TYPE",
    "AudioReceived",
    "CallerError",
    "CallerEvent",
    "CallerSession",
    "CallerSettings",
    "Closed",
    "Connected",
    "IceCompleted",
    "RtcpReceived",
]

OPUS_PAYLOAD_TYPE: Final = 111
"""The payload type Chromium offers Opus with, and so do we."""

DtlsSetup = Literal["actpass", "active", "passive"]

_ICE_CHARACTERS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_UFRAG_LENGTH: Final = 8
# Host candidate priority, and the peer-reflexive priority a check carries (RFC 8445
# 5.1.2.1 and 7.1.1): type preference 126 or 110, local preference 65535, component 1.
_HOST_PRIORITY: Final = (126 << 24) | (65535 << 8) | 255
_PRFLX_PRIORITY: Final = (110 << 24) | (65535 << 8) | 255
_STUN_HEADER: Final = struct.Struct("!HHI")
_STUN_SUCCESS: Final = 0x0101
_STUN_ERROR: Final = 0x0111
_MAX_REMEMBERED_TRANSACTIONS: Final = 16
_STRONG_FINGERPRINTS: Final = ("sha-256", "sha-384", "sha-512")


class CallerError(RuntimeError):
    """The caller's API was used out of order (an answer twice, no answer yet)."""


@dataclass(frozen=True, slots=True)
class CallerSettings:
    """Timers of the caller; the defaults are close to Chromium's."""

    check_initial_interval: float = 0.05
    """First retransmission of a connectivity check, doubled each time after."""
    check_max_interval: float = 1.6
    """Cap on the retransmission interval of a connectivity check."""
    check_transmissions: int = 7
    """Transmissions of one STUN transaction (RFC 8489 Rc) before a new one starts."""
    consent_interval: float = 2.5
    """Mean seconds between consent checks once ICE completed (randomised 0.8x-1.2x)."""
    consent_timeout: float = 30.0
    setup_timeout: float = 20.0
    """Seconds from the answer to SRTP keys before the call is given up."""
    rtcp_interval: float = 5.0
    """Mean seconds between our RTCP reports (randomised 0.5x-1.5x)."""
    srtp_replay_window: int = 1024


@dataclass(frozen=True, slots=True)
class IceCompleted:
    """The first connectivity check succeeded: the peer's candidate is reachable."""

    address: Address
    elapsed: float
    """Seconds since the session was created."""


@dataclass(frozen=True, slots=True)
class RtcpReceived:
    """A decrypted RTCP compound packet from the peer, parsed."""

    packets: tuple[RtcpPacket, ...]
    arrival: float


CallerEvent = IceCompleted | Connected | AudioReceived | RtcpReceived | Closed


@dataclass(slots=True)
class _Transaction:
    """The connectivity check being retransmitted until it is answered."""

    transaction_id: bytes
    request: bytes
    transmissions: int
    next_at: float
    interval: float


class CallerSession(CallStatus):
    """The client side of one call; see the module docstring for how to drive it.

    Besides the status of :class:`~voxrelay.proto.media.CallStatus` (``is_connected``,
    ``packets_sent``, ``round_trip_time``, ...) it counts dropped datagrams in ``drops``
    and STUN error responses in ``stun_errors``.
    """

    def __init__(
        self,
        certificate: DtlsCertificate,
        *,
        now: float,
        dtls_role_preference: DtlsSetup = "actpass",
        ssrc: int | None = None,
        cname: str | None = None,
        settings: CallerSettings | None = None,
        dtls_configuration: DtlsConfiguration | None = None,
        wall_offset: float = 0.0,
    ) -> None:
        """``dtls_role_preference`` is the offer's a=setup; ``wall_offset`` turns ``now``
        into Unix time for the NTP timestamps of RTCP sender reports."""
        if dtls_role_preference not in ("actpass", "active", "passive"):
            raise ValueError(
                f"dtls_role_preference {dtls_role_preference!r} is not actpass, active or passive"
            )
        self.settings = settings or CallerSettings()
        self.certificate = certificate
        self.created_at = now
        self.setup: DtlsSetup = dtls_role_preference
        self.ssrc = random.getrandbits(32) if ssrc is None else ssrc
        if not 0 <= self.ssrc <= 0xFFFFFFFF:
            raise ValueError(f"ssrc {self.ssrc} is not a 32-bit unsigned integer")
        self.cname = cname or secrets.token_urlsafe(12)
        self.local_ufrag = "".join(secrets.choice(_ICE_CHARACTERS) for _ in range(_UFRAG_LENGTH))
        self.local_pwd = generate_ice_pwd()
        self.tie_breaker = random.getrandbits(64)
        self.remote_address: Address | None = None
        """The answer's candidate: where every datagram of :meth:`datagrams_to_send` goes."""
        self.remote_ufrag: str | None = None
        self.remote_pwd: str | None = None
        self.drops: Counter[str] = Counter()
        """Datagrams dropped, by reason (for the load generator's report and tests)."""
        self.stun_errors: Counter[int] = Counter()
        """STUN error responses to our checks, by code (401: the peer rejects our pwd)."""

        self._dtls_configuration = dtls_configuration
        self._session_id = random.getrandbits(62)
        self._stream_id = secrets.token_hex(8)
        self._events: list[CallerEvent] = []  # a deque would hold a 64-slot block per call
        self._outgoing: list[bytes] = []
        self._closed_reason: str | None = None
        self._answered_at: float | None = None
        # ICE: the check being retransmitted, then consent; transaction ids we sent.
        self._check: _Transaction | None = None
        self._transactions: dict[bytes, None] = {}
        self._ice_completed = False
        self._last_response_at: float | None = None
        self._next_consent_at: float | None = None
        # DTLS-SRTP, RTP and RTCP; DTLS joins once the answer settles our role.
        self._media = MediaStream(
            None,
            ssrc=self.ssrc,
            cname=self.cname,
            payload_type=OPUS_PAYLOAD_TYPE,
            drops=self.drops,
            rtcp_interval=self.settings.rtcp_interval,
            srtp_replay_window=self.settings.srtp_replay_window,
            wall_offset=wall_offset,
        )

    # ------------------------------------------------------------------ status

    @property
    def dtls(self) -> DtlsConnection | None:
        """The call's DTLS connection, from :meth:`accept_answer` on."""
        return self._media.dtls

    @property
    def payload_type(self) -> int:
        """The Opus payload type we send: ours until the answer names its own."""
        return self._media.payload_type

    @property
    def is_ice_completed(self) -> bool:
        return self._ice_completed

    # ---------------------------------------------------------------- signaling

    def offer_sdp(self, candidate_address: str, candidate_port: int) -> str:
        """Return our offer: one bundled audio m-line (Opus) with one host candidate.

        ``candidate_address``/``candidate_port`` is the local UDP socket the engine sends
        from; the peer checks nothing against it (an ICE-lite peer learns our address
        from our checks), but it is written as a browser would.
        """
        address = ipaddress.ip_address(candidate_address)
        if not 1 <= candidate_port <= 65535:
            raise ValueError(f"candidate_port {candidate_port} is not in 1..65535")
        fingerprint = self.certificate.fingerprint("sha-256")
        track_id = secrets.token_hex(8)
        pt = OPUS_PAYLOAD_TYPE
        lines = [
            "v=0",
            f"o=- {self._session_id} 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0",
            f"a=msid-semantic: WMS {self._stream_id}",
            f"m=audio {candidate_port} UDP/TLS/RTP/SAVPF {pt}",
            f"c=IN IP{address.version} {address}",
            f"a=candidate:1 1 udp {_HOST_PRIORITY} {address} {candidate_port} typ host "
            "generation 0",
            f"a=ice-ufrag:{self.local_ufrag}",
            f"a=ice-pwd:{self.local_pwd}",
            f"a=fingerprint:sha-256 {fingerprint}",
            f"a=setup:{self.setup}",
            "a=mid:0",
            "a=sendrecv",
            f"a=msid:{self._stream_id} {track_id}",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            f"a=rtpmap:{pt} opus/48000/2",
            f"a=fmtp:{pt} minptime=10;useinbandfec=1",
            f"a=ssrc:{self.ssrc} cname:{self.cname}",
            f"a=ssrc:{self.ssrc} msid:{self._stream_id} {track_id}",
            "a=end-of-candidates",
        ]
        return "\r\n".join(lines) + "\r\n"

    def accept_answer(self, answer_sdp: str | bytes, now: float | None = None) -> None:
        """Take the peer's answer; with ``now``, the first connectivity check goes out now.

        Without ``now`` the check is due at once: :meth:`get_timer` returns the creation
        time. Raises :class:`~voxrelay.proto.sdp.SdpError` for an answer the call cannot
        use, and :class:`CallerError` if an answer was already accepted.
        """
        if self._answered_at is not None:
            raise CallerError("accept_answer() was already called for this call")
        description = parse_offer(answer_sdp)
        audio = next(
            (section for section in description.media if section.mid == "0"),
            next((section for section in description.media if section.kind == "audio"), None),
        )
        if audio is None or audio.kind != "audio":
            raise SdpError("the answer has no audio m-line for mid 0")
        if audio.port == 0:
            raise SdpError("the answer rejected the audio m-line (port 0)")
        if not audio.ice_ufrag or not audio.ice_pwd:
            raise SdpError("the answer has no a=ice-ufrag and a=ice-pwd")
        if ":" in audio.ice_ufrag or not audio.ice_ufrag.isascii() or not audio.ice_pwd.isascii():
            raise SdpError("the answer's ICE credentials are not ICE characters")
        fingerprints = [
            (fp.algorithm, fp.value)
            for fp in audio.fingerprints
            if fp.algorithm in _STRONG_FINGERPRINTS
        ]
        if not fingerprints:
            raise SdpError("the answer has no sha-256, sha-384 or sha-512 a=fingerprint")
        opus = next((codec for codec in audio.codecs if codec.is_opus), None)
        if opus is None:
            raise SdpError("the answer does not accept Opus (opus/48000/2)")
        remote_address = next(
            (
                (ip, c.port)
                for c in audio.candidates
                if c.transport == "udp" and c.component == 1 and c.port
                if (ip := _ip_literal(c.address)) is not None
            ),
            None,
        )
        if remote_address is None:
            raise SdpError("the answer has no UDP candidate with an IP address")
        role = self._negotiated_role(audio.setup)

        self.remote_ufrag = audio.ice_ufrag
        self.remote_pwd = audio.ice_pwd
        self.remote_address = remote_address
        self._media.payload_type = opus.payload_type
        self._media.dtls = DtlsConnection(
            role,
            self.certificate,
            expected_remote_fingerprint=fingerprints,
            configuration=self._dtls_configuration,
        )
        start = self.created_at if now is None else now
        self._answered_at = start
        self._check = self._new_check(start, use_candidate=True)
        if now is not None:
            self._transmit_check(self._check, now)

    def _negotiated_role(self, answer_setup: str | None) -> DtlsRole:
        # RFC 5763 section 5: the answerer picks from actpass; otherwise it must mirror us.
        allowed = {"actpass": ("active", "passive"), "active": ("passive",)}.get(
            self.setup, ("active",)
        )
        if answer_setup not in allowed:
            raise SdpError(
                f"the answer's a=setup:{answer_setup} does not fit our a=setup:{self.setup}"
            )
        return DtlsRole.SERVER if answer_setup == "active" else DtlsRole.CLIENT

    # ------------------------------------------------------------------ inputs

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Handle one datagram from the peer's address (the engine filters by address)."""
        if self._closed_reason is not None:
            self.drops["closed"] += 1
            return
        if self.dtls is None or not data:
            self.drops["no_answer" if data else "empty"] += 1
            return
        first = data[0]
        if first <= 3:
            self._receive_stun(bytes(data), now)
        elif 128 <= first <= 191:
            if len(data) >= 2 and 192 <= data[1] <= 223:
                self._receive_rtcp(bytes(data), now)
            elif (audio := self._media.receive_rtp(bytes(data), now)) is not None:
                self._events.append(audio)
        elif 20 <= first <= 63:
            self._apply(self._media.receive_dtls(data, now), now)
        else:
            self.drops["unknown_protocol"] += 1

    def handle_timer(self, now: float) -> None:
        """Run what is due: check retransmission, consent, DTLS, RTCP, setup timeout."""
        if self._closed_reason is not None or self.dtls is None:
            return
        assert self._answered_at is not None
        # Deadlines are compared as get_timer() computes them, so a timer at the deadline
        # always fires (now - start can round below the timeout).
        if not self._media.is_keyed and now >= self._answered_at + self.settings.setup_timeout:
            self._close("setup timeout", now, polite=False)
            return
        last = self._last_response_at
        if last is not None and now >= last + self.settings.consent_timeout:
            self._close("consent expired", now, polite=False)
            return
        check = self._check
        if check is not None and now >= check.next_at:
            if check.transmissions >= self.settings.check_transmissions:
                # RFC 8489 6.2.1: the transaction failed; keep checking with a fresh one.
                check = self._check = self._new_check(now, use_candidate=True)
                check.interval = self.settings.check_max_interval
            self._transmit_check(check, now)
        if self._next_consent_at is not None and now >= self._next_consent_at:
            self._transmit_check(self._new_check(now, use_candidate=False), now)
            self._next_consent_at = now + self._consent_interval()
        self._apply(self._media.handle_timer(now), now)

    def send_audio(self, payload: bytes, now: float, samples: int = SAMPLES_PER_FRAME) -> bool:
        """Send one Opus frame; False (and nothing sent) before SRTP keys exist or after close.

        The marker bit starts each talkspurt, whose first timestamp accounts for the pause.
        """
        if self._closed_reason is not None:
            return False
        packet = self._media.protect_audio(payload, now, samples)
        if packet is None:
            return False
        self._outgoing.append(packet)
        return True

    def close(self, now: float, reason: str = "closed by caller") -> None:
        """Hang up: RTCP BYE and DTLS close_notify when keys exist, then :class:`Closed`."""
        if self._closed_reason is None:
            self._close(reason, now, polite=True)

    # ----------------------------------------------------------------- outputs

    def datagrams_to_send(self) -> list[bytes]:
        """Return and forget the datagrams to send, all to :attr:`remote_address`."""
        if not self._outgoing:
            return []
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due; None before the answer and once closed."""
        if self._closed_reason is not None or self.dtls is None:
            return None
        assert self._answered_at is not None
        candidates = [self._media.get_timer(), self._next_consent_at]
        if self._check is not None:
            candidates.append(self._check.next_at)
        if not self._media.is_keyed:
            candidates.append(self._answered_at + self.settings.setup_timeout)
        if self._last_response_at is not None:
            candidates.append(self._last_response_at + self.settings.consent_timeout)
        due = [t for t in candidates if t is not None]
        return min(due) if due else None

    def next_event(self) -> CallerEvent | None:
        return self._events.pop(0) if self._events else None

    # ------------------------------------------------------------------- ICE

    def _new_check(self, now: float, *, use_candidate: bool) -> _Transaction:
        assert self.remote_ufrag is not None and self.remote_pwd is not None
        transaction_id = os.urandom(12)
        attributes: dict[str, object] = {
            "USERNAME": f"{self.remote_ufrag}:{self.local_ufrag}",
            "PRIORITY": _PRFLX_PRIORITY,
            "ICE-CONTROLLING": self.tie_breaker,
        }
        if use_candidate:
            attributes["USE-CANDIDATE"] = None
        message = aioice_stun.Message(
            aioice_stun.Method.BINDING,
            aioice_stun.Class.REQUEST,
            transaction_id=transaction_id,
            attributes=attributes,
        )
        message.add_message_integrity(self.remote_pwd.encode("ascii"))
        self._transactions[transaction_id] = None
        while len(self._transactions) > _MAX_REMEMBERED_TRANSACTIONS:
            del self._transactions[next(iter(self._transactions))]
        return _Transaction(
            transaction_id, bytes(message), 0, now, self.settings.check_initial_interval
        )

    def _transmit_check(self, check: _Transaction, now: float) -> None:
        self._outgoing.append(check.request)
        if check.transmissions:
            check.interval = min(check.interval * 2, self.settings.check_max_interval)
        check.transmissions += 1
        check.next_at = now + check.interval

    def _consent_interval(self) -> float:
        return self.settings.consent_interval * random.uniform(0.8, 1.2)

    def _receive_stun(self, data: bytes, now: float) -> None:
        """Accept a response to one of our checks, signed with the peer's ice-pwd."""
        if len(data) < 20:
            self.drops["stun_malformed"] += 1
            return
        message_type, length, cookie = _STUN_HEADER.unpack_from(data)
        if cookie != aioice_stun.COOKIE or length != len(data) - 20 or length % 4:
            self.drops["stun_malformed"] += 1
            return
        if message_type not in (_STUN_SUCCESS, _STUN_ERROR):
            # Requests too: an ICE-lite peer never checks, and we answer nothing.
            self.drops["stun_not_binding_response"] += 1
            return
        if data[8:20] not in self._transactions:
            self.drops["stun_unknown_transaction"] += 1
            return
        try:
            message = aioice_stun.parse_message(data)
        except (ValueError, struct.error, IndexError):
            self.drops["stun_malformed"] += 1
            return
        if message_type == _STUN_ERROR:
            code = message.attributes.get("ERROR-CODE")
            self.stun_errors[code[0] if isinstance(code, tuple) else 0] += 1
            self.drops["stun_error_response"] += 1
            return
        assert self.remote_pwd is not None
        if "FINGERPRINT" not in message.attributes or not message.check_message_integrity(
            self.remote_pwd.encode("ascii")
        ):
            self.drops["stun_integrity_failed"] += 1
            return
        self._last_response_at = now
        if not self._ice_completed:
            self._ice_completed = True
            self._check = None
            self._next_consent_at = now + self._consent_interval()
            assert self.remote_address is not None and self.dtls is not None
            self._events.append(IceCompleted(self.remote_address, now - self.created_at))
            if self.dtls.role is DtlsRole.CLIENT:
                self._apply(self._media.start_handshake(now), now)

    # ------------------------------------------------------------------- media

    def _receive_rtcp(self, data: bytes, now: float) -> None:
        packets = self._media.receive_rtcp(data, now)
        if packets is None:
            return
        self._events.append(RtcpReceived(tuple(packets), now))
        if any(isinstance(packet, Bye) for packet in packets):
            self._close("peer sent RTCP BYE", now, polite=False)

    def _apply(self, update: StreamUpdate, now: float) -> None:
        self._outgoing.extend(update.datagrams)
        if update.keyed is not None:
            assert self.remote_address is not None
            elapsed = now - self.created_at
            self._events.append(Connected.after(update.keyed, self.remote_address, elapsed))
        if update.end_reason is not None:
            self._close(update.end_reason, now, polite=update.end_politely)

    def _close(self, reason: str, now: float, *, polite: bool) -> None:
        self._outgoing.extend(self._media.close(now, reason, polite=polite))
        self._closed_reason = reason
        self._check = None
        self._next_consent_at = None
        self._events.append(Closed(reason, now - self.created_at))


def _ip_literal(address: str) -> str | None:
    """``address`` in canonical form if it is an IP literal (not a host or mDNS name)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None
