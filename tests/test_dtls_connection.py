"""DtlsConnection pairs driven with a fake clock: handshakes, loss, reordering,
duplication, fragmentation, authentication failures, alerts and the Chromium capture."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxrelay.proto.dtls import (
    CLIENT,
    SERVER,
    AlertDescription,
    AlertLevel,
    AlertReceived,
    ApplicationData,
    CipherSuite,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    DtlsStateError,
    HandshakeCompleted,
    NamedGroup,
    SrtpProfile,
    generate_certificate,
)
from voxrelay.proto.dtls.constants import ContentType, ExtensionType, HandshakeType
from voxrelay.proto.dtls.handshake import (
    ClientHello,
    HelloVerifyRequest,
    ServerHello,
    ServerKeyExchange,
    encode_handshake_fragment,
    find_extension,
    parse_handshake_fragments,
    parse_use_srtp,
)
from voxrelay.proto.dtls.record import (
    MAX_PLAINTEXT_LENGTH,
    MAX_SEQUENCE_NUMBER,
    encode_record,
    parse_records,
)

CHROMIUM_CLIENT_HELLO = (
    Path(__file__).parent / "data" / "chromium156_clienthello.bin"
).read_bytes()
TICK = 0.005
START = 1000.0

SERVER_CERT = generate_certificate(1.7e9)
CLIENT_CERT = generate_certificate(1.7e9)


def fingerprint_of(cert) -> tuple[str, str]:
    return ("sha-256", cert.fingerprint())


def make_pair(
    server_config: DtlsConfiguration | None = None,
    client_config: DtlsConfiguration | None = None,
    server_srtp: tuple[SrtpProfile, ...] | None = None,
    client_srtp: tuple[SrtpProfile, ...] | None = None,
    server_expects: tuple[str, str] | None = None,
    client_expects: tuple[str, str] | None = None,
) -> tuple[DtlsConnection, DtlsConnection]:
    client = DtlsConnection(
        CLIENT,
        CLIENT_CERT.certificate,
        CLIENT_CERT.private_key,
        expected_remote_fingerprint=client_expects or fingerprint_of(SERVER_CERT),
        configuration=client_config,
        **({} if client_srtp is None else {"srtp_profiles": client_srtp}),
    )
    server = DtlsConnection(
        SERVER,
        SERVER_CERT,
        expected_remote_fingerprint=server_expects or fingerprint_of(CLIENT_CERT),
        configuration=server_config,
        peer_address=b"\x01\x04\x13\x88" + bytes(20),
        **({} if server_srtp is None else {"srtp_profiles": server_srtp}),
    )
    return client, server


Filter = Callable[[int, str, list[bytes]], list[bytes]]


@dataclass
class Run:
    now: float
    client_events: list = field(default_factory=list)
    server_events: list = field(default_factory=list)
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def completed(self, side: str) -> HandshakeCompleted:
        events = self.client_events if side == "client" else self.server_events
        done = [e for e in events if isinstance(e, HandshakeCompleted)]
        assert len(done) == 1, events
        return done[0]


def drive(
    client: DtlsConnection,
    server: DtlsConnection,
    now: float = START,
    network: Filter | None = None,
    max_steps: int = 400,
    run: Run | None = None,
) -> Run:
    """Move datagrams both ways until both sides are quiet; fire timers when idle.

    ``network(batch_index, direction, datagrams)`` returns what actually arrives.
    """
    run = run or Run(now)
    batch = 0
    for _ in range(max_steps):
        moved = False
        for sender, receiver, direction in ((client, server, "c2s"), (server, client, "s2c")):
            datagrams = sender.datagrams_to_send(run.now)
            if not datagrams:
                continue
            moved = True
            run.sent.extend((direction, d) for d in datagrams)
            delivered = network(batch, direction, datagrams) if network else datagrams
            batch += 1
            for datagram in delivered:
                receiver.receive_datagram(datagram, run.now)
        for conn, events in ((client, run.client_events), (server, run.server_events)):
            while (event := conn.next_event()) is not None:
                events.append(event)
        if moved:
            run.now += TICK
            continue
        timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
        if not timers:
            break
        run.now = max(run.now, min(timers))
        client.handle_timer(run.now)
        server.handle_timer(run.now)
    return run


def handshake(client: DtlsConnection, server: DtlsConnection, network: Filter | None = None) -> Run:
    client.start_handshake(START)
    return drive(client, server, START, network)


def assert_keys_agree(run: Run) -> None:
    client, server = run.completed("client"), run.completed("server")
    assert client.local_srtp_key == server.remote_srtp_key
    assert client.local_srtp_salt == server.remote_srtp_salt
    assert client.remote_srtp_key == server.local_srtp_key
    assert client.remote_srtp_salt == server.local_srtp_salt
    assert client.local_srtp_key != client.remote_srtp_key
    assert client.srtp_profile == server.srtp_profile
    assert client.cipher_suite == server.cipher_suite


def handshake_fragments(datagram: bytes) -> list:
    return [
        fragment
        for record in parse_records(datagram)
        if record.content_type == ContentType.HANDSHAKE and record.epoch == 0
        for fragment in parse_handshake_fragments(record.fragment)
    ]


# --- successful handshakes ----------------------------------------------------------------


@pytest.mark.parametrize("suite", list(CipherSuite))
@pytest.mark.parametrize("group", list(NamedGroup))
@pytest.mark.parametrize(
    "profile",
    [
        SrtpProfile.AEAD_AES_128_GCM,
        SrtpProfile.AEAD_AES_256_GCM,
        SrtpProfile.AES128_CM_HMAC_SHA1_80,
    ],
)
def test_handshake_completes_for_every_suite_group_and_srtp_profile(suite, group, profile):
    config = DtlsConfiguration(cipher_suites=(suite,), groups=(group,))
    client, server = make_pair(server_config=config, server_srtp=(profile,))
    run = handshake(client, server)
    assert_keys_agree(run)
    done = run.completed("server")
    assert (done.cipher_suite, done.group, done.srtp_profile) == (suite, group, profile)
    assert len(done.local_srtp_key) == profile.key_length
    assert len(done.local_srtp_salt) == profile.salt_length
    assert done.extended_master_secret
    # The exporter is the one RFC 5764 describes: both sides' material concatenated.
    material = server.export_keying_material(
        b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
    )
    assert material == client.export_keying_material(b"EXTRACTOR-dtls_srtp", len(material))
    client_done = run.completed("client")
    assert material == (
        client_done.local_srtp_key
        + client_done.remote_srtp_key
        + client_done.local_srtp_salt
        + client_done.remote_srtp_salt
    )


def test_handshake_reports_fingerprints_certificates_and_time():
    client, server = make_pair()
    run = handshake(client, server)
    assert run.completed("server").remote_fingerprint == fingerprint_of(CLIENT_CERT)
    assert run.completed("client").remote_fingerprint == fingerprint_of(SERVER_CERT)
    assert run.completed("server").remote_certificate == CLIENT_CERT.der
    assert run.completed("client").remote_certificate == SERVER_CERT.der
    # The driver delivers both directions in one tick: four flights take two ticks, and
    # each side measures from its first flight to its last received one.
    assert run.completed("client").handshake_time == pytest.approx(TICK)
    assert run.completed("server").handshake_time == pytest.approx(TICK)
    assert client.get_timer() is None and server.get_timer() is None


def test_server_picks_srtp_profile_by_its_own_preference():
    client, server = make_pair(
        client_srtp=(SrtpProfile.AEAD_AES_128_GCM, SrtpProfile.AES128_CM_HMAC_SHA1_80),
        server_srtp=(SrtpProfile.AES128_CM_HMAC_SHA1_80, SrtpProfile.AEAD_AES_128_GCM),
    )
    run = handshake(client, server)
    assert run.completed("client").srtp_profile is SrtpProfile.AES128_CM_HMAC_SHA1_80


def test_server_picks_cipher_suite_and_group_by_its_own_preference():
    client, server = make_pair(
        server_config=DtlsConfiguration(
            cipher_suites=(
                CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
            groups=(NamedGroup.SECP256R1, NamedGroup.X25519),
        )
    )
    done = handshake(client, server).completed("client")
    assert done.cipher_suite is CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
    assert done.group is NamedGroup.SECP256R1


def test_without_srtp_profiles_no_srtp_is_negotiated():
    client, server = make_pair(client_srtp=(), server_srtp=())
    done = handshake(client, server).completed("server")
    assert done.srtp_profile is None and done.local_srtp_key == b""


def test_application_data_flows_both_ways():
    client, server = make_pair()
    run = handshake(client, server)
    client.send_application_data(b"ping")
    server.send_application_data(b"pong" * 1000)
    drive(client, server, run=run)
    assert ApplicationData(b"ping") in run.server_events
    assert ApplicationData(b"pong" * 1000) in run.client_events


def test_application_data_before_handshake_is_refused():
    client, _ = make_pair()
    with pytest.raises(DtlsStateError, match="wait for HandshakeCompleted"):
        client.send_application_data(b"too early")


def test_oversized_application_data_is_refused():
    client, server = make_pair()
    handshake(client, server)
    with pytest.raises(ValueError, match="exceeds one record"):
        client.send_application_data(bytes(16385))


# --- loss, reordering, duplication, fragmentation -----------------------------------------


@pytest.mark.parametrize("lost_flight", [0, 1, 2, 3])
def test_each_lost_flight_is_recovered_by_retransmission(lost_flight):
    dropped = []

    def network(batch, direction, datagrams):
        if batch == lost_flight and not dropped:
            dropped.append(batch)
            return []
        return datagrams

    client, server = make_pair()
    run = handshake(client, server, network)
    assert dropped == [lost_flight]
    assert_keys_agree(run)
    # Recovery took one initial retransmission timeout (1 s).
    assert run.now - START >= 1.0


def test_losing_every_flight_once_still_completes():
    first_copies: set[bytes] = set()

    def network(batch, direction, datagrams):
        kept = []
        for datagram in datagrams:
            fingerprint = bytes(fragment.msg_type for fragment in _safe_fragments(datagram))
            key = direction.encode() + fingerprint
            if key in first_copies:
                kept.append(datagram)
            else:
                first_copies.add(key)
        return kept

    client, server = make_pair()
    assert_keys_agree(handshake(client, server, network))


def _safe_fragments(datagram: bytes) -> list:
    try:
        return handshake_fragments(datagram)
    except Exception:
        return []


def test_reordered_and_duplicated_datagrams_with_tiny_mtu():
    rng = random.Random(7)
    config = DtlsConfiguration(max_datagram_size=90)

    def network(batch, direction, datagrams):
        delivered = datagrams + rng.sample(datagrams, k=len(datagrams) // 2)
        rng.shuffle(delivered)
        return delivered

    client, server = make_pair(server_config=config, client_config=config)
    run = handshake(client, server, network)
    assert_keys_agree(run)
    assert max(len(d) for _, d in run.sent) <= 90
    # The certificate really was split into several fragments.
    certificate_fragments = {
        fragment.fragment_offset
        for direction, datagram in run.sent
        if direction == "s2c"
        for fragment in handshake_fragments(datagram)
        if fragment.msg_type == HandshakeType.CERTIFICATE
    }
    assert len(certificate_fragments) >= 4


@pytest.mark.parametrize("seed", range(4))
def test_random_loss_reordering_and_duplication(seed):
    rng = random.Random(seed)
    config = DtlsConfiguration(max_datagram_size=200, max_retransmissions=12)

    def network(batch, direction, datagrams):
        delivered = [d for d in datagrams if rng.random() > 0.25]
        delivered += [d for d in datagrams if rng.random() < 0.2]
        rng.shuffle(delivered)
        return delivered

    client, server = make_pair(server_config=config, client_config=config)
    assert_keys_agree(handshake(client, server, network))


def test_flights_respect_default_max_datagram_size():
    client, server = make_pair()
    run = handshake(client, server)
    assert all(len(d) <= 1200 for _, d in run.sent)


def test_peer_retransmission_triggers_our_retransmission():
    client, server = make_pair()
    client.start_handshake(START)
    hello = client.datagrams_to_send(START)
    server.receive_datagram(hello[0], START)
    first = server.datagrams_to_send(START)
    # The same ClientHello again (a client retransmission): the server repeats its flight.
    client.handle_timer(START + 1.0)
    repeat = client.datagrams_to_send(START + 1.0)
    server.receive_datagram(repeat[0], START + 1.0)
    again = server.datagrams_to_send(START + 1.0)
    assert [len(d) for d in again] == [len(d) for d in first]
    assert again != first  # fresh record sequence numbers
    # An exact duplicate datagram is a replay and triggers nothing.
    server.receive_datagram(repeat[0], START + 1.0)
    assert server.datagrams_to_send(START + 1.0) == []


# --- timers -------------------------------------------------------------------------------


def test_retransmission_timer_doubles_up_to_the_cap_then_gives_up():
    config = DtlsConfiguration(
        initial_retransmit_timeout=0.5, max_retransmit_timeout=2.0, max_retransmissions=4
    )
    client, _ = make_pair(client_config=config)
    client.start_handshake(START)
    first = client.datagrams_to_send(START)
    deadlines = []
    while (timer := client.get_timer()) is not None:
        deadlines.append(timer)
        client.handle_timer(timer - 0.001)  # early: nothing happens
        assert client.datagrams_to_send(timer) == []
        client.handle_timer(timer)
        sent = client.datagrams_to_send(timer)
        if client.get_timer() is not None:
            assert [len(d) for d in sent] == [len(d) for d in first]
    gaps = [round(b - a, 6) for a, b in zip([START, *deadlines], deadlines, strict=False)]
    assert gaps == [0.5, 1.0, 2.0, 2.0, 2.0]
    closed = client.next_event()
    assert isinstance(closed, ConnectionClosed)
    assert closed.alert is None and "timed out after 4 retransmissions" in closed.reason


def test_server_has_no_timer_before_a_client_hello_or_after_completion():
    client, server = make_pair()
    assert server.get_timer() is None
    handshake(client, server)
    assert server.get_timer() is None


# --- authentication -----------------------------------------------------------------------


def test_server_rejects_client_certificate_with_wrong_fingerprint():
    wrong = ("sha-256", ":".join(["AB"] * 32))
    client, server = make_pair(server_expects=wrong)
    run = handshake(client, server)
    assert not any(isinstance(e, HandshakeCompleted) for e in run.server_events)
    closed = run.server_events[-1]
    assert isinstance(closed, ConnectionClosed) and not closed.by_peer
    assert closed.alert is AlertDescription.BAD_CERTIFICATE
    assert "does not match the fingerprint signalled in SDP" in closed.reason
    assert AlertReceived(AlertLevel.FATAL, AlertDescription.BAD_CERTIFICATE) in run.client_events
    assert isinstance(run.client_events[-1], ConnectionClosed)
    assert run.client_events[-1].by_peer
    with pytest.raises(DtlsStateError):
        server.export_keying_material(b"EXTRACTOR-dtls_srtp", 60)


def test_client_rejects_server_certificate_with_wrong_fingerprint():
    other = generate_certificate(1.7e9)
    client, server = make_pair(client_expects=fingerprint_of(other))
    run = handshake(client, server)
    assert run.client_events[-1].alert is AlertDescription.BAD_CERTIFICATE
    assert not any(isinstance(e, HandshakeCompleted) for e in run.client_events)
    assert not any(isinstance(e, HandshakeCompleted) for e in run.server_events)


def test_any_of_several_expected_fingerprints_is_accepted():
    _, server = make_pair()
    client = DtlsConnection(
        CLIENT,
        CLIENT_CERT,
        expected_remote_fingerprint=[
            ("sha-256", ":".join(["00"] * 32)),
            ("sha-1", SERVER_CERT.fingerprint("sha-1").lower()),
        ],
    )
    run = handshake(client, server)
    assert run.completed("client").remote_fingerprint == (
        "sha-1",
        SERVER_CERT.fingerprint("sha-1"),
    )


def test_invalid_expected_fingerprint_is_rejected_at_construction():
    with pytest.raises(ValueError, match="32 colon-separated hex bytes"):
        DtlsConnection(SERVER, SERVER_CERT, expected_remote_fingerprint=("sha-256", "AB:CD"))
    with pytest.raises(ValueError, match="unknown fingerprint algorithm"):
        DtlsConnection(SERVER, SERVER_CERT, expected_remote_fingerprint=("md5", "AB"))


# --- cookie exchange ----------------------------------------------------------------------


def test_cookie_exchange_adds_a_hello_verify_round_trip():
    config = DtlsConfiguration(cookie_exchange=True, cookie_secret=b"k" * 32)
    client, server = make_pair(server_config=config)
    run = handshake(client, server)
    assert_keys_agree(run)
    first_reply = next(d for direction, d in run.sent if direction == "s2c")
    (fragment,) = handshake_fragments(first_reply)
    assert fragment.msg_type == HandshakeType.HELLO_VERIFY_REQUEST
    verify = HelloVerifyRequest.parse(fragment.body)
    assert len(verify.cookie) == 32
    second_hello = [d for direction, d in run.sent if direction == "c2s"][1]
    (fragment,) = handshake_fragments(second_hello)
    assert fragment.message_seq == 1
    assert ClientHello.parse(fragment.body).cookie == verify.cookie


def test_hello_verify_request_echoes_the_client_hello_record_sequence_number():
    config = DtlsConfiguration(cookie_exchange=True, cookie_secret=b"k" * 32)
    client, server = make_pair(server_config=config)
    client.start_handshake(START)
    client.datagrams_to_send(START)
    client.handle_timer(START + 1)  # retransmitted ClientHello: record sequence number 1
    (hello,) = client.datagrams_to_send(START + 1)
    server.receive_datagram(hello, START + 1)
    (reply,) = server.datagrams_to_send(START + 1)
    (record,) = parse_records(reply)
    assert record.sequence_number == parse_records(hello)[0].sequence_number == 1
    assert record.version == 0xFEFF
    assert server.get_timer() is None  # the server keeps no retransmission state


def test_cookie_bound_to_another_address_is_answered_with_a_new_verify_request():
    config = DtlsConfiguration(cookie_exchange=True, cookie_secret=b"k" * 32)
    client, server = make_pair(server_config=config)
    client.start_handshake(START)
    server.receive_datagram(client.datagrams_to_send(START)[0], START)
    client.receive_datagram(server.datagrams_to_send(START)[0], START)
    second_hello = client.datagrams_to_send(START)[0]
    elsewhere = DtlsConnection(
        SERVER,
        SERVER_CERT,
        expected_remote_fingerprint=fingerprint_of(CLIENT_CERT),
        configuration=config,
        peer_address=b"another address",
    )
    elsewhere.receive_datagram(second_hello, START)
    (reply,) = elsewhere.datagrams_to_send(START)
    assert handshake_fragments(reply)[0].msg_type == HandshakeType.HELLO_VERIFY_REQUEST
    # The server at the right address, even a fresh object, accepts the same ClientHello.
    fresh = DtlsConnection(
        SERVER,
        SERVER_CERT,
        expected_remote_fingerprint=fingerprint_of(CLIENT_CERT),
        configuration=config,
        peer_address=b"\x01\x04\x13\x88" + bytes(20),
    )
    fresh.receive_datagram(second_hello, START + 1)
    reply = fresh.datagrams_to_send(START + 1)[0]
    hello_fragment = handshake_fragments(reply)[0]
    assert hello_fragment.msg_type == HandshakeType.SERVER_HELLO
    assert hello_fragment.message_seq == 1


# --- Chromium's real ClientHello ----------------------------------------------------------


def chromium_server(**kwargs) -> DtlsConnection:
    return DtlsConnection(
        SERVER, SERVER_CERT, expected_remote_fingerprint=fingerprint_of(CLIENT_CERT), **kwargs
    )


def server_flight_messages(datagrams: list[bytes]) -> dict[int, bytes]:
    bodies: dict[int, bytearray] = {}
    for datagram in datagrams:
        for fragment in handshake_fragments(datagram):
            body = bodies.setdefault(fragment.msg_type, bytearray(fragment.length))
            body[fragment.fragment_offset : fragment.fragment_offset + len(fragment.body)] = (
                fragment.body
            )
    return {kind: bytes(body) for kind, body in bodies.items()}


@pytest.mark.parametrize("order", ["in order", "reversed", "duplicated"])
def test_chromium_156_client_hello_is_answered_with_dtls12_ems_and_use_srtp(order):
    first, second = CHROMIUM_CLIENT_HELLO[:1200], CHROMIUM_CLIENT_HELLO[1200:]
    assert (len(first), len(second)) == (1200, 263)
    datagrams = {
        "in order": [first, second],
        "reversed": [second, first],
        "duplicated": [first, first, second, first, second],
    }[order]
    server = chromium_server()
    for datagram in datagrams:
        server.receive_datagram(datagram, START)
    assert server.next_event() is None
    flight = server.datagrams_to_send(START)
    assert all(len(d) <= 1200 for d in flight)
    assert all(record.version == 0xFEFD for d in flight for record in parse_records(d))
    messages = server_flight_messages(flight)
    assert sorted(messages) == [
        HandshakeType.SERVER_HELLO,
        HandshakeType.CERTIFICATE,
        HandshakeType.SERVER_KEY_EXCHANGE,
        HandshakeType.CERTIFICATE_REQUEST,
        HandshakeType.SERVER_HELLO_DONE,
    ]
    hello = ServerHello.parse(messages[HandshakeType.SERVER_HELLO])
    assert hello.server_version == 0xFEFD
    assert hello.cipher_suite == CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    assert find_extension(hello.extensions, ExtensionType.EXTENDED_MASTER_SECRET) == b""
    assert find_extension(hello.extensions, ExtensionType.RENEGOTIATION_INFO) == b"\x00"
    assert parse_use_srtp(find_extension(hello.extensions, ExtensionType.USE_SRTP)) == (
        (SrtpProfile.AEAD_AES_128_GCM,),
        b"",
    )
    assert find_extension(hello.extensions, ExtensionType.SUPPORTED_VERSIONS) is None
    key_exchange = ServerKeyExchange.parse(messages[HandshakeType.SERVER_KEY_EXCHANGE])
    assert key_exchange.named_group == NamedGroup.X25519


def test_chromium_client_hello_with_srtp_preference_for_aes_cm():
    server = chromium_server(srtp_profiles=[SrtpProfile.AES128_CM_HMAC_SHA1_80])
    server.receive_datagram(CHROMIUM_CLIENT_HELLO[:1200], START)
    server.receive_datagram(CHROMIUM_CLIENT_HELLO[1200:], START)
    hello = ServerHello.parse(
        server_flight_messages(server.datagrams_to_send(START))[HandshakeType.SERVER_HELLO]
    )
    assert parse_use_srtp(find_extension(hello.extensions, ExtensionType.USE_SRTP))[0] == (
        SrtpProfile.AES128_CM_HMAC_SHA1_80,
    )


def test_chromium_client_hello_without_common_srtp_profile_fails():
    server = chromium_server(srtp_profiles=[SrtpProfile.AES128_CM_HMAC_SHA1_32])
    server.receive_datagram(CHROMIUM_CLIENT_HELLO[:1200], START)
    server.receive_datagram(CHROMIUM_CLIENT_HELLO[1200:], START)
    closed = server.next_event()
    assert closed.alert is AlertDescription.HANDSHAKE_FAILURE
    assert "no common SRTP protection profile" in closed.reason
    (alert,) = server.datagrams_to_send(START)
    assert alert[0] == ContentType.ALERT and alert[-2:] == bytes((2, 40))


# --- malformed input and alerts -----------------------------------------------------------


def chromium_hello() -> ClientHello:
    body = bytearray(1413)
    for datagram in (CHROMIUM_CLIENT_HELLO[:1200], CHROMIUM_CLIENT_HELLO[1200:]):
        for fragment in handshake_fragments(datagram):
            body[fragment.fragment_offset : fragment.fragment_offset + len(fragment.body)] = (
                fragment.body
            )
    return ClientHello.parse(bytes(body))


def hello_datagram(hello: ClientHello) -> bytes:
    body = hello.encode()
    fragment = encode_handshake_fragment(HandshakeType.CLIENT_HELLO, len(body), 0, 0, body)
    return encode_record(ContentType.HANDSHAKE, 0xFEFF, 0, 0, fragment)


def closed_event(conn: DtlsConnection) -> ConnectionClosed:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    assert isinstance(events[-1], ConnectionClosed), events
    return events[-1]


def test_client_hello_without_extended_master_secret_is_refused_by_default():
    hello = chromium_hello()
    legacy = ClientHello(
        hello.client_version,
        hello.random,
        cipher_suites=hello.cipher_suites,
        extensions=tuple(
            e for e in hello.extensions if e[0] != ExtensionType.EXTENDED_MASTER_SECRET
        ),
    )
    server = chromium_server()
    server.receive_datagram(hello_datagram(legacy), START)
    closed = closed_event(server)
    assert closed.alert is AlertDescription.HANDSHAKE_FAILURE
    assert "extended_master_secret" in closed.reason
    permissive = chromium_server(
        configuration=DtlsConfiguration(require_extended_master_secret=False)
    )
    permissive.receive_datagram(hello_datagram(legacy), START)
    messages = server_flight_messages(permissive.datagrams_to_send(START))
    server_hello = ServerHello.parse(messages[HandshakeType.SERVER_HELLO])
    assert find_extension(server_hello.extensions, ExtensionType.EXTENDED_MASTER_SECRET) is None


# Malformed handshake messages, alerts and ChangeCipherSpecs inside well-framed records
# during the handshake get a fatal alert. Record-layer garbage (truncated headers or
# lengths, unknown content types) is dropped silently instead: see RECORD_LAYER_GARBAGE.
@pytest.mark.parametrize(
    ("datagram", "alert", "message"),
    [
        (
            encode_record(22, 0xFEFD, 0, 0, encode_handshake_fragment(1, 10, 0, 8, b"abcd")),
            "DECODE_ERROR",
            "exceeds message length",
        ),
        (encode_record(22, 0xFEFD, 0, 0, b""), "DECODE_ERROR", "carries no fragment"),
        (encode_record(21, 0xFEFD, 0, 0, b"\x02"), "DECODE_ERROR", "alerts are 2 bytes"),
        (encode_record(20, 0xFEFD, 0, 0, b"\x02"), "DECODE_ERROR", "ChangeCipherSpec"),
        (
            encode_record(22, 0xFEFD, 0, 0, encode_handshake_fragment(2, 3, 0, 0, b"abc")),
            "UNEXPECTED_MESSAGE",
            "server_hello is not expected",
        ),
        (
            encode_record(22, 0xFEFD, 0, 0, encode_handshake_fragment(1, 3, 0, 0, b"abc")),
            "DECODE_ERROR",
            "ClientHello is truncated",
        ),
    ],
)
def test_malformed_input_gets_a_fatal_alert_and_an_event(datagram, alert, message):
    server = chromium_server()
    server.receive_datagram(datagram, START)
    closed = closed_event(server)
    assert closed.alert is AlertDescription[alert]
    assert message in closed.reason
    (sent,) = server.datagrams_to_send(START)
    assert sent == encode_record(21, 0xFEFD, 0, 0, bytes((2, AlertDescription[alert])))
    # A closed connection ignores everything after.
    server.receive_datagram(CHROMIUM_CLIENT_HELLO[:1200], START)
    assert server.datagrams_to_send(START) == [] and server.next_event() is None


def test_repeated_extension_is_an_illegal_parameter():
    hello = chromium_hello()
    doubled = ClientHello(
        hello.client_version,
        hello.random,
        cipher_suites=hello.cipher_suites,
        extensions=(*hello.extensions, hello.extensions[0]),
    )
    server = chromium_server()
    server.receive_datagram(hello_datagram(doubled), START)
    assert closed_event(server).alert is AlertDescription.ILLEGAL_PARAMETER


def test_dtls_1_0_only_client_gets_protocol_version_alert():
    hello = chromium_hello()
    old = ClientHello(0xFEFF, hello.random, cipher_suites=hello.cipher_suites)
    server = chromium_server()
    server.receive_datagram(hello_datagram(old), START)
    assert closed_event(server).alert is AlertDescription.PROTOCOL_VERSION


def test_tampered_and_replayed_records_are_dropped_silently():
    client, server = make_pair()
    run = handshake(client, server)
    client.send_application_data(b"once")
    (datagram,) = client.datagrams_to_send(run.now)
    tampered = bytearray(datagram)
    tampered[-1] ^= 1
    server.receive_datagram(bytes(tampered), run.now)
    assert server.next_event() is None
    server.receive_datagram(datagram, run.now)
    server.receive_datagram(datagram, run.now)  # replay
    assert server.next_event() == ApplicationData(b"once")
    assert server.next_event() is None
    assert server.is_connected


def test_plaintext_alert_after_handshake_is_ignored():
    client, server = make_pair()
    handshake(client, server)
    server.receive_datagram(encode_record(21, 0xFEFD, 0, 99, b"\x02\x28"), START + 1)
    assert server.is_connected and server.next_event() is None


def test_plaintext_handshake_after_handshake_is_ignored():
    client, server = make_pair()
    handshake(client, server)
    hello = chromium_hello().encode()
    fragment = encode_handshake_fragment(1, len(hello), 5, 0, hello)
    server.receive_datagram(encode_record(22, 0xFEFD, 0, 77, fragment), START + 1)
    assert server.is_connected and server.next_event() is None
    assert server.datagrams_to_send(START + 1) == []


# --- invalid records are dropped, never fatal (RFC 6347 4.1.2.7) ----------------------------

# Anyone who can forge the peer's UDP source can send these, so none may end the connection.
# name: (datagram, the reason it is counted under while the handshake is in progress)
RECORD_LAYER_GARBAGE: dict[str, tuple[bytes, str]] = {
    "one-byte": (b"\x17", "malformed"),
    "truncated-header": (b"\x16\xfe\xfd" + bytes(5), "malformed"),
    "length-beyond-datagram": (
        b"\x16\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x40" + bytes(10),
        "malformed",
    ),
    "length-over-dtls-limit": (
        b"\x17\xfe\xfd\x00\x01" + bytes(6) + b"\xff\xff" + bytes(100),
        "malformed",
    ),
    "not-a-dtls-version": (encode_record(22, 0x0303, 0, 0, bytes(16)), "malformed"),
    "unknown-content-type": (encode_record(99, 0xFEFD, 0, 0, b"x"), "unknown_content_type"),
    "unknown-epoch": (encode_record(22, 0xFEFD, 9, 0, bytes(16)), "unknown_epoch"),
    "oversized-plaintext": (
        encode_record(22, 0xFEFD, 0, 1, bytes(MAX_PLAINTEXT_LENGTH + 1)),
        "oversized",
    ),
    "epoch0-application-data": (
        encode_record(23, 0xFEFD, 0, 1 << 40, b"hi"),
        "early_application_data",
    ),
}
# A handshake record under epoch-1 keys nobody has: buffered until the keys exist, then
# it fails authentication.
FORGED_EPOCH1_HANDSHAKE = encode_record(22, 0xFEFD, 1, 1 << 40, bytes(60))

# Once connected, every epoch-0 record is unauthenticated, however well-formed.
GARBAGE_AFTER_HANDSHAKE: dict[str, tuple[bytes, str]] = {
    **RECORD_LAYER_GARBAGE,
    "oversized-plaintext": (
        RECORD_LAYER_GARBAGE["oversized-plaintext"][0],
        "plaintext_after_handshake",
    ),
    "epoch0-application-data": (
        RECORD_LAYER_GARBAGE["epoch0-application-data"][0],
        "plaintext_after_handshake",
    ),
    "epoch0-handshake-garbage": (
        encode_record(22, 0xFEFD, 0, 1 << 40, bytes(5)),
        "plaintext_after_handshake",
    ),
    "epoch0-empty-handshake": (encode_record(22, 0xFEFD, 0, 3, b""), "plaintext_after_handshake"),
    "epoch0-fragment-beyond-message": (
        encode_record(22, 0xFEFD, 0, 4, encode_handshake_fragment(1, 10, 0, 8, b"abcd")),
        "plaintext_after_handshake",
    ),
    "epoch0-odd-length-alert": (
        encode_record(21, 0xFEFD, 0, 5, b"\x02"),
        "plaintext_after_handshake",
    ),
    "epoch0-fatal-alert": (
        encode_record(21, 0xFEFD, 0, 6, b"\x02\x28"),
        "plaintext_after_handshake",
    ),
    "epoch0-close-notify": (
        encode_record(21, 0xFEFD, 0, 7, b"\x01\x00"),
        "plaintext_after_handshake",
    ),
    "epoch0-bad-change-cipher-spec": (
        encode_record(20, 0xFEFD, 0, 8, b"\x02"),
        "plaintext_after_handshake",
    ),
    "forged-epoch1-application-data": (
        encode_record(23, 0xFEFD, 1, 1 << 40, bytes(60)),
        "unauthenticated",
    ),
    "forged-epoch1-alert": (encode_record(21, 0xFEFD, 1, 9, bytes(26)), "unauthenticated"),
    "forged-epoch1-handshake": (FORGED_EPOCH1_HANDSHAKE, "unauthenticated"),
    "epoch2": (encode_record(23, 0xFEFD, 2, 0, bytes(60)), "unknown_epoch"),
}


def exchange_application_data(client: DtlsConnection, server: DtlsConnection, run: Run) -> None:
    """Both directions still carry application data."""
    client.send_application_data(b"still there?")
    server.send_application_data(b"still here.")
    drive(client, server, run=run)
    assert run.server_events[-1] == ApplicationData(b"still there?")
    assert run.client_events[-1] == ApplicationData(b"still here.")


@pytest.mark.parametrize(
    ("datagram", "reason"), RECORD_LAYER_GARBAGE.values(), ids=RECORD_LAYER_GARBAGE
)
def test_record_layer_garbage_before_the_handshake_is_dropped_and_counted(datagram, reason):
    client, server = make_pair()
    server.receive_datagram(datagram, START)
    assert server.next_event() is None and server.datagrams_to_send(START) == []
    assert server.dropped_records == {reason: 1}
    run = handshake(client, server)
    assert_keys_agree(run)
    exchange_application_data(client, server, run)


def test_forged_epoch1_record_before_the_handshake_is_dropped_once_keys_exist():
    client, server = make_pair()
    server.receive_datagram(FORGED_EPOCH1_HANDSHAKE, START)
    assert server.next_event() is None and server.datagrams_to_send(START) == []
    run = handshake(client, server)
    assert_keys_agree(run)
    assert server.dropped_records["unauthenticated"] == 1
    exchange_application_data(client, server, run)


def test_record_layer_garbage_around_every_flight_does_not_stop_the_handshake():
    garbage = [datagram for datagram, _ in RECORD_LAYER_GARBAGE.values()]
    garbage.append(FORGED_EPOCH1_HANDSHAKE)

    def network(batch: int, direction: str, datagrams: list[bytes]) -> list[bytes]:
        return [*garbage, *datagrams, *garbage]

    client, server = make_pair()
    run = handshake(client, server, network)
    assert_keys_agree(run)
    for conn in (client, server):
        assert conn.dropped_records["malformed"] >= 5
        assert conn.dropped_records["unauthenticated"] >= 1
    exchange_application_data(client, server, run)


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(
    ("datagram", "reason"), GARBAGE_AFTER_HANDSHAKE.values(), ids=GARBAGE_AFTER_HANDSHAKE
)
def test_invalid_records_after_the_handshake_are_dropped_and_counted(side, datagram, reason):
    client, server = make_pair()
    run = handshake(client, server)
    victim = server if side == "server" else client
    dropped = victim.dropped_records.copy()
    victim.receive_datagram(datagram, run.now)
    assert victim.is_connected
    assert victim.next_event() is None and victim.datagrams_to_send(run.now) == []
    assert victim.dropped_records - dropped == {reason: 1}
    exchange_application_data(client, server, run)


def test_records_before_garbage_in_one_datagram_are_still_processed():
    client, server = make_pair()
    run = handshake(client, server)
    client.send_application_data(b"first")
    (datagram,) = client.datagrams_to_send(run.now)
    dropped = server.dropped_records.copy()
    server.receive_datagram(datagram + b"\x17\xfe", run.now)
    assert server.next_event() == ApplicationData(b"first")
    assert server.dropped_records - dropped == {"malformed": 1}
    assert server.is_connected


def test_malformed_alert_in_an_authenticated_record_is_still_fatal():
    # Only the peer holds the epoch-1 keys, so its broken records deserve an alert.
    client, server = make_pair()
    run = handshake(client, server)
    client._queue_record(ContentType.ALERT, b"\x02", client._write_epochs[1])
    drive(client, server, run=run)
    closed = [event for event in run.server_events if isinstance(event, ConnectionClosed)]
    assert [event.alert for event in closed] == [AlertDescription.DECODE_ERROR]
    assert "alerts are 2 bytes" in closed[0].reason


FORGED_RECORDS = st.builds(
    encode_record,
    st.integers(0, 255),
    st.sampled_from([0xFEFD, 0xFEFF, 0x0303]),
    st.integers(0, 3),
    st.integers(0, MAX_SEQUENCE_NUMBER),
    st.binary(max_size=120),
)


def test_no_forged_datagram_ends_an_established_connection():
    client, server = make_pair()
    run = handshake(client, server)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(st.binary(max_size=60), FORGED_RECORDS), min_size=1, max_size=3))
    def feed(parts: list[bytes]) -> None:
        datagram = b"".join(parts)
        for conn in (client, server):
            conn.receive_datagram(datagram, run.now)
            assert conn.is_connected
            assert conn.next_event() is None and conn.datagrams_to_send(run.now) == []

    feed()
    assert server.dropped_records  # the forgeries were seen, and dropped
    exchange_application_data(client, server, run)


def test_close_notify_closes_both_sides():
    client, server = make_pair()
    run = handshake(client, server)
    client.close(run.now)
    drive(client, server, run=run)
    assert run.client_events[-1] == ConnectionClosed(
        "closed locally", AlertDescription.CLOSE_NOTIFY, by_peer=False
    )
    assert run.server_events[-2:] == [
        AlertReceived(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY),
        ConnectionClosed("peer sent close_notify", AlertDescription.CLOSE_NOTIFY, by_peer=True),
    ]
    assert client.is_closed and server.is_closed
    with pytest.raises(DtlsStateError):
        server.send_application_data(b"late")


def test_renegotiation_attempt_gets_a_warning_and_the_connection_survives():
    client, server = make_pair()
    run = handshake(client, server)
    # Forge nothing: have the client protect a whole ClientHello under its epoch-1 keys,
    # with the next message_seq the server expects.
    hello = chromium_hello().encode()
    fragment = encode_handshake_fragment(1, len(hello), 5, 0, hello)
    client._queue_record(ContentType.HANDSHAKE, fragment, client._write_epochs[1])
    drive(client, server, run=run)
    assert AlertReceived(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION) in (
        run.client_events
    )
    assert server.is_connected and client.is_connected


# --- fuzzing ------------------------------------------------------------------------------


def assert_no_internal_error(conn: DtlsConnection) -> None:
    while (event := conn.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            assert event.alert is not AlertDescription.INTERNAL_ERROR, event.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzzed_datagrams_never_raise(data):
    server = chromium_server()
    server.receive_datagram(data, START)
    assert_no_internal_error(server)
    client, _ = make_pair()
    client.start_handshake(START)
    client.receive_datagram(data, START)
    assert_no_internal_error(client)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1462), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_chromium_client_hello_never_raises(mutations):
    data = bytearray(CHROMIUM_CLIENT_HELLO)
    for offset, value in mutations:
        data[offset] = value
    server = chromium_server()
    server.receive_datagram(bytes(data[:1200]), START)
    server.receive_datagram(bytes(data[1200:]), START)
    assert_no_internal_error(server)


mutations = st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4)


def mutate(datagrams: list[bytes], changes: list[tuple[int, int]]) -> list[bytes]:
    joined = bytearray(b"".join(datagrams))
    for offset, value in changes:
        joined[offset % len(joined)] = value
    out, position = [], 0
    for datagram in datagrams:
        out.append(bytes(joined[position : position + len(datagram)]))
        position += len(datagram)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_mutated_server_flight_never_raises_in_the_client(changes):
    client, server = make_pair()
    client.start_handshake(START)
    for datagram in client.datagrams_to_send(START):
        server.receive_datagram(datagram, START)
    for datagram in mutate(server.datagrams_to_send(START), changes):
        client.receive_datagram(datagram, START)
    assert_no_internal_error(client)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_mutated_client_flight_never_raises_in_the_server(changes):
    client, server = make_pair()
    client.start_handshake(START)
    for datagram in client.datagrams_to_send(START):
        server.receive_datagram(datagram, START)
    for datagram in server.datagrams_to_send(START):
        client.receive_datagram(datagram, START)
    for datagram in mutate(client.datagrams_to_send(START), changes):
        server.receive_datagram(datagram, START)
    assert_no_internal_error(server)
