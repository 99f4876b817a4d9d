"""A whole call, sans-IO: :class:`CallSession` (the transceiver's side, answered with
:func:`build_answer` as ``Transceiver.create_call`` does) against :class:`CallerSession`
(the client's side), over an in-memory network on a fake clock.

Nothing is mocked but the wire and the clock: both sides run real STUN (aioice's codec),
real DTLS 1.2 (proto/dtls, both roles) with real certificates, real SRTP (libsrtp) and
real RTP/RTCP. The network delays, loses, duplicates and reorders datagrams with a seeded
random generator, so every run sees the same weather.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pylibsrtp
import pytest
from aioice import stun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxrelay.proto.caller import (
    CallerError,
    CallerSession,
    CallerSettings,
    IceCompleted,
    RtcpReceived,
)
from voxrelay.proto.dtls import DtlsCertificate, DtlsRole, SrtpProfile, generate_certificate
from voxrelay.proto.ice_lite import Address
from voxrelay.proto.rtcp import Bye, SenderReport, SourceDescription, parse_rtcp
from voxrelay.proto.sdp import SdpError, build_answer, parse_offer
from voxrelay.proto.session import (
    AudioReceived,
    CallSession,
    CallSettings,
    Closed,
    Connected,
    IceConnected,
)

START = 1_000.0
WALL_OFFSET = 1_700_000_000.0  # makes START a plausible Unix time for RTCP's NTP stamps
CALLER_ADDRESS: Address = ("192.0.2.10", 40000)
STRANGER_ADDRESS: Address = ("198.51.100.7", 50000)
SERVER_CANDIDATE: Address = ("203.0.113.5", 3478)
SERVER_UFRAG = "Srv0ufragToken0000000000"
SERVER_SSRC = 0x5EED0001
FRAME_INTERVAL = 0.02
SRTP_PROFILES = {
    SrtpProfile.AES128_CM_HMAC_SHA1_80: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    SrtpProfile.AES128_CM_HMAC_SHA1_32: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    SrtpProfile.AEAD_AES_128_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    SrtpProfile.AEAD_AES_256_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}
ONE_WAY_DELAY = 0.01


@pytest.fixture(scope="module")
def certificates() -> tuple[DtlsCertificate, DtlsCertificate]:
    """The caller's and the server's certificates."""
    return (
        generate_certificate(WALL_OFFSET + START),
        generate_certificate(WALL_OFFSET + START),
    )


@dataclass
class Network:
    """Both directions of the path: a fixed delay, plus seeded loss, duplication and an
    extra random delay up to ``spread`` (which reorders datagrams sent close together)."""

    delay: float = ONE_WAY_DELAY
    loss: float = 0.0
    duplication: float = 0.0
    spread: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    lost: int = 0

    def arrivals(self, now: float) -> list[float]:
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return []
        copies = 2 if self.duplication and self.rng.random() < self.duplication else 1
        return [now + self.delay + self.rng.uniform(0, self.spread) for _ in range(copies)]


def frame(index: int) -> bytes:
    return b"frame %06d" % index


class CallPair:
    """A caller and a server session joined by a :class:`Network`, on one fake clock.

    The server echoes every frame it receives, as the echo backend does. ``block`` can
    drop chosen datagrams (``"to_server"``/``"to_caller"``, bytes) before the network.
    """

    def __init__(
        self,
        certificates: tuple[DtlsCertificate, DtlsCertificate],
        *,
        setup: str = "actpass",
        network: Network | None = None,
        server_settings: CallSettings | None = None,
        caller_settings: CallerSettings | None = None,
        answer: bool = True,
    ) -> None:
        caller_certificate, server_certificate = certificates
        self.now = START
        self.network = network or Network()
        self.caller = CallerSession(
            caller_certificate,
            now=self.now,
            dtls_role_preference=setup,  # type: ignore[arg-type]
            settings=caller_settings,
            wall_offset=WALL_OFFSET,
        )
        self.offer_sdp = self.caller.offer_sdp(*CALLER_ADDRESS)
        self.answer = build_answer(
            parse_offer(self.offer_sdp),
            ice_ufrag=SERVER_UFRAG,
            fingerprint_sha256=server_certificate.fingerprint("sha-256"),
            candidate_address=SERVER_CANDIDATE[0],
            candidate_port=SERVER_CANDIDATE[1],
            ssrc=SERVER_SSRC,
            cname="voxrelay-test",
            session_id=1,
        )
        self.server_certificate = server_certificate
        self.server = CallSession(
            self.answer,
            server_certificate,
            ssrc=SERVER_SSRC,
            cname="voxrelay-1",
            now=self.now,
            settings=server_settings,
            wall_offset=WALL_OFFSET,
        )
        self.echo = True
        self.block: Callable[[str, bytes], bool] | None = None
        self.caller_events: list = []
        self.server_events: list = []
        self.sent: list[tuple[float, str, bytes]] = []  # everything sent, before the network
        self.misdirected: list[tuple[bytes, Address]] = []
        self._in_flight: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()
        self._frames_left = 0
        self._next_frame_index = 0
        self._next_frame_at: float | None = None
        if answer:
            self.accept_answer()

    def accept_answer(self, sdp: str | None = None) -> None:
        """The caller takes the answer (``sdp``, else the real one) and checks at once."""
        self.caller.accept_answer(sdp or self.answer.sdp, self.now)
        self.collect()

    # -------------------------------------------------------------- driving

    def start_audio(self, frames: int) -> None:
        """The caller sends ``frames`` frames, one every 20 ms, from now (once connected)."""
        self._frames_left = frames
        self._next_frame_at = self.now

    def run_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Advance the clock event by event until ``condition`` or ``timeout`` seconds."""
        deadline = self.now + timeout
        for _ in range(200_000):
            self.collect()
            # The server keeps its timer from one input to the next unless the input may
            # move it: after every step, what it keeps is what it would work out afresh.
            assert self.server.get_timer() == self.server._next_timer(), "stale timer"
            if condition():
                return True
            due = [
                t
                for t in (
                    self._in_flight[0][0] if self._in_flight else None,
                    self.caller.get_timer(),
                    self.server.get_timer(),
                    self._next_frame_at,
                )
                if t is not None
            ]
            if not due or min(due) > deadline:
                self.now = deadline
                return condition()
            self.now = max(min(due), self.now)
            self._step()
        raise AssertionError("the clock stopped advancing: a timer that handle_timer never clears")

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, seconds)

    def connect(self, timeout: float = 5.0) -> None:
        assert self.run_until(
            lambda: self.caller.is_connected and self.server.is_connected, timeout
        )

    def _step(self) -> None:
        now = self.now
        while self._in_flight and self._in_flight[0][0] <= now:
            _, _, direction, data = heapq.heappop(self._in_flight)
            if direction == "to_server":
                self.server.receive_datagram(data, CALLER_ADDRESS, now)
            else:
                self.caller.receive_datagram(data, now)
        for session in (self.caller, self.server):
            timer = session.get_timer()
            if timer is not None and timer <= now:
                session.handle_timer(now)
        if self._next_frame_at is not None and self._next_frame_at <= now:
            if self.caller.is_connected:
                self.caller.send_audio(frame(self._next_frame_index), now)
                self._next_frame_index += 1
                self._frames_left -= 1
            self._next_frame_at = now + FRAME_INTERVAL if self._frames_left > 0 else None

    def collect(self) -> None:
        now = self.now
        while (event := self.server.next_event()) is not None:
            self.server_events.append((now, event))
            if self.echo and isinstance(event, AudioReceived):
                self.server.send_audio(event.payload, now)
        while (event := self.caller.next_event()) is not None:
            self.caller_events.append((now, event))
        for data in self.caller.datagrams_to_send():
            self.transmit("to_server", data)
        for data, address in self.server.datagrams_to_send():
            if address == CALLER_ADDRESS:
                self.transmit("to_caller", data)
            else:
                self.misdirected.append((data, address))

    def transmit(self, direction: str, data: bytes) -> None:
        self.sent.append((self.now, direction, data))
        if self.block is not None and self.block(direction, data):
            return
        for arrival in self.network.arrivals(self.now):
            heapq.heappush(self._in_flight, (arrival, next(self._order), direction, data))

    # -------------------------------------------------------------- reading

    def events(self, side: str, kind: type) -> list:
        source = self.server_events if side == "server" else self.caller_events
        return [event for _, event in source if isinstance(event, kind)]

    def sent_datagrams(self, direction: str, since: float = 0.0) -> list[bytes]:
        return [data for at, d, data in self.sent if d == direction and at >= since]


def is_stun(data: bytes) -> bool:
    return data[0] <= 3


def is_dtls(data: bytes) -> bool:
    return 20 <= data[0] <= 63


def is_rtcp(data: bytes) -> bool:
    return 128 <= data[0] <= 191 and 192 <= data[1] <= 223


def is_rtp(data: bytes) -> bool:
    return 128 <= data[0] <= 191 and not is_rtcp(data)


# ---------------------------------------------------------------------------- the offer


def test_caller_offer_is_browser_like_and_answerable(certificates) -> None:
    caller = CallerSession(certificates[0], now=START, ssrc=0xCA11E4)
    offer = parse_offer(caller.offer_sdp("192.0.2.10", 40000))

    assert offer.bundle_groups == (("0",),)
    assert not offer.ice_lite
    (audio,) = offer.media
    assert (audio.kind, audio.mid, audio.protocol) == ("audio", "0", "UDP/TLS/RTP/SAVPF")
    assert audio.rtcp_mux and audio.rtcp_rsize
    assert audio.direction == "sendrecv"
    assert audio.setup == "actpass"
    (opus,) = audio.codecs
    assert (opus.payload_type, opus.is_opus) == (111, True)
    assert opus.parameters == {"minptime": "10", "useinbandfec": "1"}
    assert (audio.ice_ufrag, audio.ice_pwd) == (caller.local_ufrag, caller.local_pwd)
    assert [(fp.algorithm, fp.value) for fp in audio.fingerprints] == [
        ("sha-256", certificates[0].fingerprint("sha-256"))
    ]
    (candidate,) = audio.candidates
    assert (candidate.type, candidate.transport) == ("host", "udp")
    assert (candidate.address, candidate.port) == ("192.0.2.10", 40000)
    assert audio.ssrcs == (0xCA11E4,)

    answer = build_answer(
        offer,
        ice_ufrag=SERVER_UFRAG,
        fingerprint_sha256=certificates[1].fingerprint("sha-256"),
        candidate_address="203.0.113.5",
        candidate_port=3478,
        ssrc=SERVER_SSRC,
        cname="voxrelay-test",
        session_id=7,
    )
    assert (answer.setup, answer.dtls_role, answer.opus_payload_type) == ("passive", "server", 111)
    assert answer.remote_ice_ufrag == caller.local_ufrag
    assert answer.opus_fmtp == "minptime=10;useinbandfec=1"


def test_caller_offer_over_ipv6() -> None:
    caller = CallerSession(generate_certificate(WALL_OFFSET + START), now=START)
    (audio,) = parse_offer(caller.offer_sdp("2001:db8::10", 40000)).media
    assert audio.connection_address == "2001:db8::10"
    assert audio.candidates[0].address == "2001:db8::10"


def test_caller_takes_ice_credentials_role_and_candidate_from_the_answer(certificates) -> None:
    pair = CallPair(certificates, answer=False)
    pair.caller.accept_answer(pair.answer.sdp)

    assert pair.caller.remote_address == SERVER_CANDIDATE
    assert pair.caller.remote_ufrag == SERVER_UFRAG
    assert pair.caller.remote_pwd == pair.answer.ice_pwd
    assert pair.caller.dtls is not None and pair.caller.dtls.role is DtlsRole.CLIENT
    # Without ``now`` the first check is due at once, not sent yet.
    assert pair.caller.datagrams_to_send() == []
    assert pair.caller.get_timer() == START


@pytest.mark.parametrize(
    ("setup", "old", "new", "message"),
    [
        ("actpass", "a=setup:passive", "a=setup:actpass", "a=setup:actpass does not fit"),
        ("passive", "a=setup:active", "a=setup:passive", "a=setup:passive does not fit"),
        ("actpass", "m=audio 3478", "m=audio 0", "rejected the audio m-line"),
        ("actpass", "a=fingerprint:sha-256", "a=fingerprint:x-unknown", "no sha-256"),
        ("actpass", " udp ", " tcp ", "no UDP candidate"),
        ("actpass", "opus/48000/2", "PCMU/8000", "does not accept Opus"),
    ],
    ids=["actpass-answer", "setup-not-mirrored", "port-0", "unknown-hash", "tcp", "pcmu"],
)
def test_caller_rejects_answers_it_cannot_use(certificates, setup, old, new, message) -> None:
    pair = CallPair(certificates, setup=setup, answer=False)
    assert old in pair.answer.sdp
    with pytest.raises(SdpError, match=message):
        pair.caller.accept_answer(pair.answer.sdp.replace(old, new))
    assert pair.caller.dtls is None and pair.caller.get_timer() is None


def test_caller_accepts_one_answer_only(certificates) -> None:
    pair = CallPair(certificates)
    with pytest.raises(CallerError):
        pair.caller.accept_answer(pair.answer.sdp)


# ---------------------------------------------------------------------------- connecting


@pytest.mark.parametrize(
    ("setup", "server_role", "caller_role"),
    [
        ("actpass", DtlsRole.SERVER, DtlsRole.CLIENT),
        ("active", DtlsRole.SERVER, DtlsRole.CLIENT),
        ("passive", DtlsRole.CLIENT, DtlsRole.SERVER),
    ],
)
def test_call_connects_and_audio_echoes(certificates, setup, server_role, caller_role) -> None:
    pair = CallPair(certificates, setup=setup)
    assert pair.server.dtls.role is server_role
    pair.connect()
    assert pair.caller.dtls is not None and pair.caller.dtls.role is caller_role

    server_milestones = [
        type(event) for _, event in pair.server_events if not isinstance(event, AudioReceived)
    ]
    assert server_milestones == [IceConnected, Connected]
    assert [type(event) for _, event in pair.caller_events] == [IceCompleted, Connected]
    (server_connected,) = pair.events("server", Connected)
    (caller_connected,) = pair.events("caller", Connected)
    assert server_connected.address == CALLER_ADDRESS
    assert caller_connected.address == SERVER_CANDIDATE
    assert server_connected.srtp_profile == caller_connected.srtp_profile is not None

    pair.start_audio(50)
    pair.run_until(lambda: len(pair.events("caller", AudioReceived)) == 50, 3.0)

    heard = pair.events("server", AudioReceived)
    assert [event.payload for event in heard] == [frame(i) for i in range(50)]
    assert {(event.ssrc, event.payload_type) for event in heard} == {(pair.caller.ssrc, 111)}
    echoed = pair.events("caller", AudioReceived)
    assert [event.payload for event in echoed] == [frame(i) for i in range(50)]
    assert {(event.ssrc, event.payload_type) for event in echoed} == {(SERVER_SSRC, 111)}
    first = echoed[0].sequence_number
    assert [event.sequence_number for event in echoed] == [(first + i) & 0xFFFF for i in range(50)]
    assert [event.arrival - echoed[0].arrival for event in echoed] == pytest.approx(
        [i * FRAME_INTERVAL for i in range(50)]
    )
    assert pair.server.drops == {} and pair.caller.drops == {}
    assert pair.misdirected == []


@pytest.mark.parametrize("setup", ["actpass", "passive"])
@pytest.mark.parametrize("seed", range(1, 8))
def test_call_survives_loss_duplication_and_reordering(certificates, setup, seed) -> None:
    # The sessions' own jitter (consent, RTCP) uses the random module: seed it too, so each
    # seed replays exactly the same run (TLS randoms change nothing the network sees).
    state = random.getstate()
    random.seed(seed)
    try:
        _lossy_call(certificates, setup, seed)
    finally:
        random.setstate(state)


def _lossy_call(certificates, setup: str, seed: int) -> None:
    network = Network(loss=0.2, duplication=0.1, spread=0.05, rng=random.Random(seed))
    pair = CallPair(certificates, setup=setup, network=network)
    pair.connect(timeout=19.0)  # the server's setup timeout is 20 s
    assert network.lost, "this seed lost nothing during the handshake: pick another"
    assert len(pair.events("server", IceConnected)) == 1
    assert len(pair.events("server", Connected)) == 1
    assert len(pair.events("caller", Connected)) == 1

    pair.start_audio(100)
    pair.run_for(2.5)

    sent = {frame(i) for i in range(100)}
    heard = [event.payload for event in pair.events("server", AudioReceived)]
    echoed = [event.payload for event in pair.events("caller", AudioReceived)]
    # Duplicates are SRTP replays: dropped, never delivered twice.
    assert len(set(heard)) == len(heard) and set(heard) <= sent
    assert len(set(echoed)) == len(echoed) and set(echoed) <= set(heard)
    # 20% loss each way leaves about 64 of 100 round trips.
    assert len(echoed) >= 40
    assert not pair.server.is_closed and not pair.caller.is_closed


def test_caller_check_retransmissions_back_off_then_start_a_new_transaction(certificates) -> None:
    pair = CallPair(certificates, answer=False)
    pair.block = lambda direction, data: direction == "to_server"
    pair.accept_answer()
    pair.run_for(10.0)

    checks = [(at, data) for at, d, data in pair.sent if d == "to_server"]
    assert all(is_stun(data) for _, data in checks)
    times = [at for at, _ in checks]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[:8] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 1.6, 1.6])
    transaction_ids = [data[8:20] for _, data in checks]
    assert len(set(transaction_ids[:7])) == 1  # retransmissions of one transaction
    assert transaction_ids[7] != transaction_ids[0]  # RFC 8489 Rc = 7, then a fresh one
    request = stun.parse_message(checks[0][1])
    assert request.attributes["USERNAME"] == f"{SERVER_UFRAG}:{pair.caller.local_ufrag}"
    assert "USE-CANDIDATE" in request.attributes
    assert request.attributes["ICE-CONTROLLING"] == pair.caller.tie_breaker
    assert request.check_message_integrity(pair.answer.ice_pwd.encode())


def test_caller_sends_consent_checks_once_connected(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    connected_at = pair.now
    pair.run_for(20.0)

    checks = [
        stun.parse_message(data)
        for data in pair.sent_datagrams("to_server", connected_at)
        if is_stun(data)
    ]
    # Every 2.5 s +-20%: 20 s hold between 6 and 10 of them.
    assert 6 <= len(checks) <= 10
    assert all("USE-CANDIDATE" not in check.attributes for check in checks)
    assert pair.server.ice.selected_address == CALLER_ADDRESS
    assert pair.server.is_connected


# ---------------------------------------------------------------------------- guarding


def test_media_and_dtls_from_an_unchecked_address_are_dropped(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    caller_dtls = [d for d in pair.sent_datagrams("to_server") if is_dtls(d)]
    assert pair.caller.send_audio(b"not from here", pair.now)
    (rtp,) = pair.caller.datagrams_to_send()
    pair.collect()
    heard_before = len(pair.events("server", AudioReceived))

    for data in [rtp, *caller_dtls]:
        pair.server.receive_datagram(data, STRANGER_ADDRESS, pair.now)
    assert pair.server.drops["unvalidated_address"] == 1 + len(caller_dtls)
    assert pair.server.datagrams_to_send() == []
    assert pair.server.next_event() is None
    assert len(pair.events("server", AudioReceived)) == heard_before
    assert pair.server.is_connected

    # A session whose checks never arrived drops the same bytes from the caller's address.
    fresh = CallSession(
        pair.answer, pair.server_certificate, ssrc=SERVER_SSRC, cname="x", now=pair.now
    )
    for data in [rtp, *caller_dtls]:
        fresh.receive_datagram(data, CALLER_ADDRESS, pair.now)
    assert fresh.drops == {"unvalidated_address": 1 + len(caller_dtls)}
    assert fresh.datagrams_to_send() == [] and fresh.next_event() is None


def test_checks_with_the_wrong_password_get_401_and_validate_nothing(certificates) -> None:
    pair = CallPair(certificates, answer=False)
    wrong_pwd = "W" * 32
    tampered = pair.answer.sdp.replace(pair.answer.ice_pwd, wrong_pwd)
    pair.accept_answer(tampered)
    pair.run_for(3.0)

    responses = [stun.parse_message(d) for d in pair.sent_datagrams("to_caller")]
    assert responses and {r.error_code for r in responses} == {401}
    assert all("MESSAGE-INTEGRITY" not in r.attributes for r in responses)
    assert pair.server.ice.last_error is not None
    assert pair.server.ice.last_error.error_code == 401
    assert not pair.server.ice.is_validated(CALLER_ADDRESS)
    assert pair.server_events == []
    assert pair.caller.stun_errors[401] == len(responses)
    assert not pair.caller.is_ice_completed and pair.caller_events == []


def test_caller_ignores_a_success_response_not_signed_with_the_server_password(
    certificates,
) -> None:
    pair = CallPair(certificates)
    request = stun.parse_message(pair.sent_datagrams("to_server")[0])
    forged = stun.Message(
        stun.Method.BINDING,
        stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
        attributes={"XOR-MAPPED-ADDRESS": CALLER_ADDRESS},
    )
    forged.add_message_integrity(b"not the server's password")
    pair.caller.receive_datagram(bytes(forged), pair.now)
    assert pair.caller.drops == {"stun_integrity_failed": 1}
    assert not pair.caller.is_ice_completed


# ---------------------------------------------------------------------------- ending


def test_server_closes_when_consent_checks_stop(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.run_for(3.0)
    last_check = max(at for at, d, data in pair.sent if d == "to_server" and is_stun(data))
    pair.block = lambda direction, data: direction == "to_server" and is_stun(data)

    assert pair.run_until(lambda: pair.server.is_closed, 40.0)
    assert pair.server.closed_reason == "consent expired"
    (closed,) = pair.events("server", Closed)
    closed_at = START + closed.elapsed
    assert closed_at == pytest.approx(last_check + ONE_WAY_DELAY + 30.0)
    assert pair.server.get_timer() is None


def test_caller_closes_when_consent_responses_stop(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.block = lambda direction, data: direction == "to_caller" and is_stun(data)
    blocked_at = pair.now

    assert pair.run_until(lambda: pair.caller.is_closed, 40.0)
    assert pair.caller.closed_reason == "consent expired"
    assert pair.now == pytest.approx(blocked_at + 30.0, abs=3.5)
    assert pair.server.is_connected  # the caller's checks still reach it
    assert pair.caller.get_timer() is None


def test_server_gives_up_when_the_caller_never_connects(certificates) -> None:
    pair = CallPair(certificates, answer=False)
    assert pair.run_until(lambda: pair.server.is_closed, 30.0)
    (closed,) = pair.events("server", Closed)
    assert (closed.reason, closed.elapsed) == ("setup timeout", 20.0)
    assert pair.server_events == [(START + 20.0, closed)]
    assert pair.sent_datagrams("to_caller") == []


def test_server_gives_up_when_dtls_never_completes(certificates) -> None:
    pair = CallPair(certificates, answer=False, server_settings=CallSettings(setup_timeout=5.0))
    pair.block = lambda direction, data: is_dtls(data)
    pair.accept_answer()
    assert pair.run_until(lambda: pair.server.is_closed, 10.0)
    assert pair.server.closed_reason == "setup timeout"
    assert [type(event) for event in pair.events("server", object)] == [IceConnected, Closed]


def test_setup_timeout_fires_when_its_timer_is_due(certificates) -> None:
    # 1004.1 + 20.0 - 1004.1 rounds below 20.0: the deadline must be compared as computed.
    pair = CallPair(certificates, answer=False)
    server = CallSession(pair.answer, certificates[1], ssrc=SERVER_SSRC, cname="x", now=1004.1)
    due = server.get_timer()
    assert due == 1004.1 + 20.0
    server.handle_timer(due)
    assert server.closed_reason == "setup timeout"


def test_consent_expires_when_its_timer_is_due(certificates) -> None:
    pair = CallPair(certificates)
    check = pair.sent_datagrams("to_server")[0]
    server = CallSession(
        pair.answer,
        certificates[1],
        ssrc=SERVER_SSRC,
        cname="x",
        now=1000.0,
        settings=CallSettings(setup_timeout=60.0),
    )
    server.receive_datagram(check, CALLER_ADDRESS, 1000.1)  # 1000.1 + 30 - 30 < 1000.1
    assert server.ice.is_validated(CALLER_ADDRESS)
    due = server.get_timer()
    assert due == 1000.1 + 30.0
    server.handle_timer(due)
    assert server.closed_reason == "consent expired"


def test_caller_gives_up_when_nothing_answers(certificates) -> None:
    pair = CallPair(certificates, answer=False, caller_settings=CallerSettings(setup_timeout=4.0))
    pair.block = lambda direction, data: direction == "to_server"
    pair.accept_answer()
    assert pair.run_until(lambda: pair.caller.is_closed, 10.0)
    assert pair.caller.closed_reason == "setup timeout"
    assert pair.now == START + 4.0


def test_caller_hang_up_closes_the_server_session(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.caller.close(pair.now)
    hung_up_at = pair.now
    goodbye = pair.caller.datagrams_to_send()
    pair.collect()
    for data in goodbye:
        pair.transmit("to_server", data)
    assert [is_rtcp(d) for d in goodbye] == [True, False] and is_dtls(goodbye[1])

    assert pair.run_until(lambda: pair.server.is_closed, 1.0)
    assert pair.server.closed_reason == "caller sent RTCP BYE"
    assert pair.events("caller", Closed)[0].reason == "closed by caller"
    assert pair.sent_datagrams("to_caller", since=hung_up_at) == []


def test_caller_close_notify_alone_closes_the_server_session(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.block = lambda direction, data: direction == "to_server" and is_rtcp(data)
    pair.caller.close(pair.now)
    assert pair.run_until(lambda: pair.server.is_closed, 1.0)
    assert pair.server.closed_reason == "dtls closed by peer"


def test_server_close_sends_bye_and_close_notify(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.server.close(pair.now)
    goodbye = [data for data, _ in pair.server.datagrams_to_send()]
    assert [is_rtcp(d) for d in goodbye] == [True, False] and is_dtls(goodbye[1])
    for data in goodbye:
        pair.transmit("to_caller", data)

    assert pair.run_until(lambda: pair.caller.is_closed, 1.0)
    assert pair.caller.closed_reason == "peer sent RTCP BYE"
    (report,) = pair.events("caller", RtcpReceived)
    bye = report.packets[-1]
    assert isinstance(bye, Bye) and bye.sources == (SERVER_SSRC,)
    assert bye.reason == "closed by server"
    assert pair.events("server", Closed)[0].reason == "closed by server"


def test_server_close_notify_alone_closes_the_caller(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.block = lambda direction, data: direction == "to_caller" and is_rtcp(data)
    pair.server.close(pair.now)
    assert pair.run_until(lambda: pair.caller.is_closed, 1.0)
    assert pair.caller.closed_reason == "dtls closed by peer"


# ---------------------------------------------------------------------------- RTCP


def test_sender_reports_count_what_was_sent_and_give_round_trip_time(certificates) -> None:
    pair = CallPair(
        certificates,
        server_settings=CallSettings(rtcp_interval=1.0),
        caller_settings=CallerSettings(rtcp_interval=1.0),
    )
    pair.connect()
    connected_at = pair.now
    pair.start_audio(200)
    pair.run_for(4.5)

    reports = [
        (event.arrival, packet)
        for event in pair.events("caller", RtcpReceived)
        for packet in event.packets
        if isinstance(packet, SenderReport)
    ]
    assert len(reports) >= 2
    first_arrival, _ = reports[0]
    assert connected_at + 0.5 <= first_arrival <= connected_at + 1.5 + ONE_WAY_DELAY
    frame_size = len(frame(0))
    for _, report in reports:
        assert report.ssrc == SERVER_SSRC
        assert 0 < report.packet_count <= pair.server.packets_sent
        assert report.octet_count == report.packet_count * frame_size
        (block,) = report.reports
        assert block.ssrc == pair.caller.ssrc
        assert (block.fraction_lost, block.cumulative_lost) == (0, 0)

    # The caller's reports carry LSR/DLSR of the server's SRs, and the other way round.
    assert pair.server.round_trip_time == pytest.approx(2 * ONE_WAY_DELAY, abs=1e-3)
    assert pair.caller.round_trip_time == pytest.approx(2 * ONE_WAY_DELAY, abs=1e-3)


def test_sender_report_decrypts_with_keys_from_the_dtls_exporter(certificates) -> None:
    """An SR read off the wire with SRTP keys derived afresh (RFC 5764 4.2), not the caller's."""
    pair = CallPair(certificates, server_settings=CallSettings(rtcp_interval=0.5))
    pair.connect()
    pair.start_audio(10)
    pair.run_for(1.0)
    wire = [data for data in pair.sent_datagrams("to_caller") if is_rtcp(data)]
    assert wire

    (connected,) = pair.events("caller", Connected)
    profile = connected.srtp_profile
    key_length, salt_length = profile.key_length, profile.salt_length
    assert pair.caller.dtls is not None
    material = pair.caller.dtls.export_keying_material(
        b"EXTRACTOR-dtls_srtp", 2 * (key_length + salt_length)
    )
    # client key, server key, client salt, server salt; the server is the DTLS server.
    server_key = material[key_length : 2 * key_length]
    server_salt = material[2 * key_length + salt_length :]
    policy = pylibsrtp.Policy(
        key=server_key + server_salt,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=SRTP_PROFILES[profile],
    )
    report, sdes = parse_rtcp(pylibsrtp.Session(policy).unprotect_rtcp(wire[0]))
    assert isinstance(report, SenderReport) and report.ssrc == SERVER_SSRC
    assert report.packet_count > 0
    assert sdes == SourceDescription(((SERVER_SSRC, ((1, b"voxrelay-1"),)),))


# ---------------------------------------------------------------------------- talkspurts


def test_marker_bit_and_timestamp_jump_after_a_pause(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    send_times = [0.0, 0.02, 0.04, 1.04, 1.06, 1.08]
    base = pair.now
    for offset in send_times:
        pair.run_until(lambda: False, base + offset - pair.now)
        assert pair.server.send_audio(b"burst", pair.now)
    pair.run_for(0.1)

    received = pair.events("caller", AudioReceived)
    assert [event.marker for event in received] == [True, False, False, True, False, False]
    steps = [
        (later.timestamp - earlier.timestamp) & 0xFFFFFFFF
        for earlier, later in itertools.pairwise(received)
    ]
    assert steps[:2] == [960, 960] and steps[3:] == [960, 960]
    assert abs(steps[2] - 48_000) <= 1  # one second of 48 kHz clock, not one frame
    sequence = [event.sequence_number for event in received]
    assert sequence == [(sequence[0] + i) & 0xFFFF for i in range(6)]


def test_send_audio_before_keys_sends_nothing(certificates) -> None:
    pair = CallPair(certificates, answer=False)
    assert not pair.server.send_audio(b"early", pair.now)
    assert not pair.caller.send_audio(b"early", pair.now)
    assert pair.server.datagrams_to_send() == [] and pair.caller.datagrams_to_send() == []


# ---------------------------------------------------------------------------- garbage


def _stun_shaped(message_type: int, body: bytes) -> bytes:
    body = body[: len(body) - len(body) % 4]
    return struct.pack("!HHI", message_type & 0x03FF, len(body), stun.COOKIE) + bytes(12) + body


def _signed_request(username: str, key: bytes, use_candidate: bool) -> bytes:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1
    if use_candidate:
        message.attributes["USE-CANDIDATE"] = None
    message.add_message_integrity(key)
    return bytes(message)


NOT_DTLS_GARBAGE = st.one_of(
    st.binary(max_size=300).filter(lambda data: not data or not 20 <= data[0] <= 63),
    st.builds(
        lambda first, second, rest: bytes([first, second]) + rest,
        st.integers(128, 191),
        st.integers(0, 255),
        st.binary(max_size=200),
    ),
    st.builds(_stun_shaped, st.integers(0, 0xFFFF), st.binary(max_size=120)),
    st.builds(
        _signed_request,
        st.text(st.characters(codec="ascii"), max_size=40),
        st.binary(min_size=1, max_size=32),
        st.booleans(),
    ),
)


def test_garbage_from_the_checked_address_never_breaks_a_call(certificates) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.echo = False

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=NOT_DTLS_GARBAGE)
    def feed(data: bytes) -> None:
        pair.server.receive_datagram(data, CALLER_ADDRESS, pair.now)
        pair.server.datagrams_to_send()
        pair.caller.receive_datagram(data, pair.now)
        pair.caller.datagrams_to_send()
        assert pair.server.is_connected and pair.caller.is_connected

    feed()
    while pair.server.next_event() is not None or pair.caller.next_event() is not None:
        pass
    assert pair.server.drops  # the garbage was seen, and dropped

    pair.echo = True
    pair.start_audio(20)
    assert pair.run_until(lambda: len(pair.events("caller", AudioReceived)) == 20, 2.0)
    assert [event.payload for event in pair.events("caller", AudioReceived)] == [
        frame(i) for i in range(20)
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x17",  # a truncated record header
        bytes([22, 0xFE, 0xFD, 0, 0]) + (1 << 40).to_bytes(6, "big") + b"\x00\x05" + bytes(5),
    ],
    ids=["truncated-header", "epoch0-handshake-garbage"],
)
def test_dtls_shaped_garbage_never_breaks_a_call(certificates, garbage) -> None:
    pair = CallPair(certificates)
    pair.connect()
    pair.server.receive_datagram(garbage, CALLER_ADDRESS, pair.now)
    assert pair.server.is_connected, pair.server.closed_reason
