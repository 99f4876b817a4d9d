"""ICE-lite connectivity checks and consent (RFC 8445, RFC 8489, RFC 7675), driven by real
STUN requests: rebuilt from Chromium's capture, built with aioice's codec, and sent by a
real aioice ICE agent over loopback UDP; and RFC 7983 demultiplexing of real datagrams."""

import asyncio
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import socket
import struct
from pathlib import Path

import pytest
from aioice import Candidate as AioiceCandidate
from aioice import Connection as AioiceConnection
from aioice import ice as aioice_ice
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.demux import classify, classify_datagram
from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.ice_lite import (
    MAX_VALIDATED_ADDRESSES,
    CandidatePairValidated,
    ConsentExpired,
    IceError,
    IceLiteSession,
    Nominated,
)

DATA = Path(__file__).parent / "data" / "chromium-156"
CHROMIUM_REQUESTS = json.loads((DATA / "stun_requests.json").read_text())

LOCAL_UFRAG = "ilfv"  # the server half of USERNAME in Chromium's capture
REMOTE_UFRAG = "1Zid"  # Chromium's a=ice-ufrag in offer.sdp
LOCAL_PWD = "kQ7vX2mR9tW4yB8nC3fH6jL1pZ"  # what our answer would have said
REMOTE_PWD = "J/FA06aTogwRsuNH7OaJHdOM"
CLIENT = ("192.0.2.2", 59563)
OTHER_CLIENT = ("192.0.2.2", 60000)

ATTRIBUTE_TYPES = {"USERNAME": 0x0006, "MESSAGE-INTEGRITY": 0x0008, "FINGERPRINT": 0x8028}


def new_session(consent_timeout: float = 30.0) -> IceLiteSession:
    return IceLiteSession(LOCAL_UFRAG, LOCAL_PWD, REMOTE_UFRAG, REMOTE_PWD, consent_timeout)


def request(
    *,
    username: str | None = f"{LOCAL_UFRAG}:{REMOTE_UFRAG}",
    key: bytes | None = LOCAL_PWD.encode(),
    controlling: bool = True,
    use_candidate: bool = False,
    priority: int | None = 1853628159,
    method: stun.Method = stun.Method.BINDING,
    message_class: stun.Class = stun.Class.REQUEST,
    fingerprint: bool = True,
    transaction_id: bytes | None = None,
) -> bytes:
    """A binding request encoded by aioice's codec, signed with ``key`` when given."""
    message = stun.Message(method, message_class, transaction_id=transaction_id)
    if username is not None:
        message.attributes["USERNAME"] = username
    message.attributes["ICE-CONTROLLING" if controlling else "ICE-CONTROLLED"] = 0x9D781643
    if use_candidate:
        message.attributes["USE-CANDIDATE"] = None
    if priority is not None:
        message.attributes["PRIORITY"] = priority
    if key is not None:
        message.add_message_integrity(key)
    elif fingerprint:
        message.add_fingerprint()
    return bytes(message)


def raw_request(
    attributes: list[tuple[int, bytes]], transaction_id: bytes, key: bytes | None
) -> bytes:
    """Encode a request attribute by attribute (RFC 8489 section 14), independently of
    aioice, then MESSAGE-INTEGRITY over it (with ``key``) and FINGERPRINT."""

    def header(body_length: int) -> bytes:
        return struct.pack("!HHI12s", 0x0001, body_length, 0x2112A442, transaction_id)

    body = b"".join(
        struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)
        for kind, value in attributes
    )
    if key is not None:
        mac = hmac.new(key, header(len(body) + 24) + body, hashlib.sha1).digest()
        body += struct.pack("!HH", 0x0008, 20) + mac
    crc = binascii.crc32(header(len(body) + 8) + body) ^ 0x5354554E
    body += struct.pack("!HHI", 0x8028, 4, crc)
    return header(len(body)) + body


def chromium_request(record: dict, key: bytes = LOCAL_PWD.encode()) -> bytes:
    """One of Chromium's captured requests, rebuilt byte for byte except for the
    MESSAGE-INTEGRITY and FINGERPRINT that follow from our known password."""
    attributes = []
    for attribute in record["attributes"]:
        kind = int(attribute["type"], 16)
        if attribute["name"] in ("MESSAGE-INTEGRITY", "FINGERPRINT"):
            continue
        if attribute["name"] == "USERNAME":
            value = attribute["value"].encode()
        elif attribute["name"] == "PRIORITY":
            value = struct.pack("!I", attribute["value"])
        else:
            value = bytes.fromhex(attribute["value"])
        attributes.append((kind, value))
    return raw_request(attributes, bytes.fromhex(record["transaction_id"]), key)


def address_of(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def events(session: IceLiteSession) -> list:
    drained = []
    while (event := session.next_event()) is not None:
        drained.append(event)
    return drained


def error_code(response: bytes) -> int:
    message = stun.parse_message(response)
    assert message.message_class == stun.Class.ERROR
    return message.attributes["ERROR-CODE"][0]


# ----------------------------------------------------------------- Chromium's requests


def test_rebuilt_chromium_requests_have_the_captured_lengths():
    for record in CHROMIUM_REQUESTS:
        data = chromium_request(record)
        assert struct.unpack_from("!H", data, 2)[0] == record["length"]
        assert data[8:20].hex() == record["transaction_id"]


def test_chromium_request_gets_a_signed_success_with_the_source_address():
    record = CHROMIUM_REQUESTS[0]  # from [::1]:38278, with USE-CANDIDATE
    source = address_of(record["src"])
    session = new_session()

    response = session.receive_stun(chromium_request(record), source, now=0.0)

    message = stun.parse_message(response)
    assert (message.message_method, message.message_class) == (
        stun.Method.BINDING,
        stun.Class.RESPONSE,
    )
    assert message.transaction_id.hex() == record["transaction_id"]
    assert message.attributes["XOR-MAPPED-ADDRESS"] == source
    assert message.check_message_integrity(LOCAL_PWD.encode())
    assert list(message.attributes) == ["XOR-MAPPED-ADDRESS", "MESSAGE-INTEGRITY", "FINGERPRINT"]
    assert events(session) == [CandidatePairValidated(source), Nominated(source)]
    assert session.is_validated(source) and session.selected_address == source
    assert session.last_error is None


def test_chromium_check_sequence_validates_each_address_and_follows_renomination():
    session = new_session()
    for record in CHROMIUM_REQUESTS:
        response = session.receive_stun(
            chromium_request(record), address_of(record["src"]), now=record["t"]
        )
        assert stun.parse_message(response).message_class == stun.Class.RESPONSE

    loopback6, ula6, ipv4, loopback4 = (
        ("::1", 38278),
        ("fd00::2", 49008),
        ("192.0.2.2", 59563),
        ("127.0.0.1", 41825),
    )
    assert events(session) == [
        CandidatePairValidated(loopback6),
        Nominated(loopback6),
        CandidatePairValidated(ula6),
        Nominated(ula6),  # Chromium moved its nomination to the better pair
        CandidatePairValidated(ipv4),
        CandidatePairValidated(loopback4),
    ]
    assert session.selected_address == ula6
    assert set(session.validated_addresses) == {loopback6, ula6, ipv4, loopback4}


def test_chromium_request_signed_with_another_password_is_unauthorized():
    session = new_session()
    data = chromium_request(CHROMIUM_REQUESTS[0], key=b"not-the-password-at-all")
    response = session.receive_stun(data, CLIENT, now=0.0)
    assert error_code(response) == 401
    assert "MESSAGE-INTEGRITY" not in stun.parse_message(response).attributes
    assert not session.is_validated(CLIENT) and events(session) == []


def test_comprehension_optional_unknown_attribute_is_ignored():
    # Chromium's GOOG-NETWORK-INFO (0xc057) is in the optional range: no 420.
    record = CHROMIUM_REQUESTS[4]
    assert any(a["type"] == "0xc057" for a in record["attributes"])
    response = new_session().receive_stun(chromium_request(record), CLIENT, now=0.0)
    assert stun.parse_message(response).message_class == stun.Class.RESPONSE


# ------------------------------------------------------------------------ error classes


def test_missing_username_is_bad_request_unsigned():
    session = new_session()
    response = session.receive_stun(request(username=None), CLIENT, 0.0)
    assert error_code(response) == 400
    assert "MESSAGE-INTEGRITY" not in stun.parse_message(response).attributes
    assert "no USERNAME" in str(session.last_error)


def test_missing_message_integrity_is_bad_request():
    session = new_session()
    response = session.receive_stun(request(key=None), CLIENT, 0.0)
    assert error_code(response) == 400
    assert session.last_error is not None and session.last_error.error_code == 400
    assert "no MESSAGE-INTEGRITY" in str(session.last_error)


@pytest.mark.parametrize(
    "username",
    [
        f"{REMOTE_UFRAG}:{LOCAL_UFRAG}",  # halves swapped
        f"{LOCAL_UFRAG}:someone-else",
        f"{LOCAL_UFRAG}",
        f"{LOCAL_UFRAG}:{REMOTE_UFRAG}x",
    ],
)
def test_wrong_username_is_unauthorized_without_integrity(username):
    session = new_session()
    response = session.receive_stun(request(username=username), CLIENT, 0.0)
    assert error_code(response) == 401
    message = stun.parse_message(response)
    assert "MESSAGE-INTEGRITY" not in message.attributes and "FINGERPRINT" in message.attributes
    assert not session.is_validated(CLIENT)


def test_wrong_password_is_unauthorized():
    session = new_session()
    response = session.receive_stun(request(key=REMOTE_PWD.encode()), CLIENT, 0.0)
    assert error_code(response) == 401
    assert "does not verify" in str(session.last_error)


def test_role_conflict_when_the_client_claims_controlled():
    session = new_session()
    response = session.receive_stun(request(controlling=False), CLIENT, 0.0)
    assert error_code(response) == 487
    message = stun.parse_message(response)
    assert message.attributes["ERROR-CODE"] == (487, "Role Conflict")
    assert message.check_message_integrity(LOCAL_PWD.encode())  # it passed authentication
    assert not session.is_validated(CLIENT) and events(session) == []


def test_unknown_comprehension_required_attribute_gets_420_listing_it():
    transaction_id = os.urandom(12)
    data = raw_request(
        [
            (0x0006, f"{LOCAL_UFRAG}:{REMOTE_UFRAG}".encode()),
            (0x0024, struct.pack("!I", 1853628159)),
            (0x0030, b"\x01\x02\x03"),
            (0x7FFF, b""),
        ],
        transaction_id,
        LOCAL_PWD.encode(),
    )
    session = new_session()
    response = session.receive_stun(data, CLIENT, 0.0)
    assert error_code(response) == 420
    message = stun.parse_message(response)
    assert message.transaction_id == transaction_id
    assert message.check_message_integrity(LOCAL_PWD.encode())
    # aioice does not decode UNKNOWN-ATTRIBUTES (0x000a): find it in the bytes.
    assert struct.pack("!HHHH", 0x000A, 4, 0x0030, 0x7FFF) in response
    assert not session.is_validated(CLIENT)


def test_unknown_attribute_after_integrity_is_ignored():
    transaction_id = os.urandom(12)
    signed = raw_request(
        [
            (0x0006, f"{LOCAL_UFRAG}:{REMOTE_UFRAG}".encode()),
            (0x0024, struct.pack("!I", 1)),
        ],
        transaction_id,
        LOCAL_PWD.encode(),
    )
    # Insert an unknown required attribute between MESSAGE-INTEGRITY and FINGERPRINT.
    without_fingerprint = signed[:-8] + struct.pack("!HH", 0x0030, 0)
    header = without_fingerprint[:2] + struct.pack("!H", len(without_fingerprint) - 12)
    without_fingerprint = header + without_fingerprint[4:]
    crc = binascii.crc32(without_fingerprint) ^ 0x5354554E
    data = without_fingerprint + struct.pack("!HHI", 0x8028, 4, crc)
    response = new_session().receive_stun(data, CLIENT, 0.0)
    assert stun.parse_message(response).message_class == stun.Class.RESPONSE


def test_check_without_priority_is_bad_request_signed():
    response = new_session().receive_stun(request(priority=None), CLIENT, 0.0)
    assert error_code(response) == 400
    assert stun.parse_message(response).check_message_integrity(LOCAL_PWD.encode())


def test_other_method_is_bad_request():
    session = new_session()
    response = session.receive_stun(request(method=stun.Method.ALLOCATE), CLIENT, 0.0)
    assert error_code(response) == 400
    assert "not Binding" in str(session.last_error)


@pytest.mark.parametrize(
    "attribute, value",
    [
        (0x0024, b"\x00\x01"),  # PRIORITY of 2 bytes: aioice's struct.unpack fails
        (0x0006, b"\xff\xfe:bad"),  # USERNAME that is not UTF-8
    ],
)
def test_malformed_attribute_is_bad_request(attribute, value):
    data = raw_request([(attribute, value)], os.urandom(12), LOCAL_PWD.encode())
    session = new_session()
    response = session.receive_stun(data, CLIENT, 0.0)
    assert error_code(response) == 400
    assert "malformed STUN attribute" in str(session.last_error)


def test_attribute_overrunning_the_message_is_bad_request():
    data = bytearray(request())
    struct.pack_into("!H", data, 22, 400)  # first attribute's length: past the end
    data = bytes(data[:-4]) + struct.pack("!I", binascii.crc32(bytes(data[:-8])) ^ 0x5354554E)
    response = new_session().receive_stun(data, CLIENT, 0.0)
    assert error_code(response) == 400


def test_fingerprint_not_last_is_bad_request():
    data = raw_request(
        [(0x8028, b"\x00\x00\x00\x00"), (0x0006, b"ilfv:1Zid")], os.urandom(12), None
    )
    assert error_code(new_session().receive_stun(data, CLIENT, 0.0)) == 400


def test_error_responses_are_valid_stun_with_fingerprint():
    for data in (request(username=None), request(username="x:y"), request(controlling=False)):
        response = new_session().receive_stun(data, CLIENT, 0.0)
        message = stun.parse_message(response)  # raises if FINGERPRINT were wrong
        assert "FINGERPRINT" in message.attributes
        assert message.transaction_id == data[8:20]


# --------------------------------------------------------------------- silent drops


@pytest.mark.parametrize(
    "message_class", [stun.Class.INDICATION, stun.Class.RESPONSE, stun.Class.ERROR]
)
def test_non_requests_are_ignored(message_class):
    session = new_session()
    assert session.receive_stun(request(message_class=message_class), CLIENT, 0.0) is None
    assert session.last_error is not None and session.last_error.error_code is None


def test_request_without_fingerprint_is_ignored():
    session = new_session()
    message = stun.parse_message(request())
    message.attributes.pop("FINGERPRINT")
    message.attributes.pop("MESSAGE-INTEGRITY")
    assert session.receive_stun(bytes(message), CLIENT, 0.0) is None
    assert "does not end with FINGERPRINT" in str(session.last_error)


def test_request_with_wrong_fingerprint_is_ignored():
    data = bytearray(request())
    data[-1] ^= 1
    session = new_session()
    assert session.receive_stun(bytes(data), CLIENT, 0.0) is None
    assert "FINGERPRINT does not match" in str(session.last_error)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        bytes(19),
        b"\x16\xfe\xfd" + bytes(40),  # DTLS
        b"\x80\x6f" + bytes(40),  # RTP
        bytes.fromhex("00010000") + b"\x21\x12\xa4\x43" + bytes(12),  # wrong cookie
        bytes.fromhex("00010004") + b"\x21\x12\xa4\x42" + bytes(12),  # length past the end
        bytes.fromhex("00010003") + b"\x21\x12\xa4\x42" + bytes(15),  # length not 4n
    ],
)
def test_garbage_is_ignored(data):
    session = new_session()
    assert session.receive_stun(data, CLIENT, 0.0) is None
    assert isinstance(session.last_error, IceError)
    assert isinstance(session.last_error, ProtocolError)
    assert events(session) == [] and session.get_timer() is None


def test_memoryview_and_bytearray_input():
    session = new_session()
    data = request()
    assert session.receive_stun(bytearray(data), CLIENT, 0.0) is not None
    assert session.receive_stun(memoryview(data), CLIENT, 0.0) is not None


# ------------------------------------------------------------------------ nomination


def test_validation_without_use_candidate_does_not_select():
    session = new_session()
    session.receive_stun(request(), CLIENT, 0.0)
    assert events(session) == [CandidatePairValidated(CLIENT)]
    assert session.is_validated(CLIENT) and session.selected_address is None


def test_nominated_is_reported_once_per_change():
    session = new_session()
    session.receive_stun(request(use_candidate=True), CLIENT, 0.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 1.0)
    session.receive_stun(request(), CLIENT, 2.0)
    assert events(session) == [CandidatePairValidated(CLIENT), Nominated(CLIENT)]
    session.receive_stun(request(use_candidate=True), OTHER_CLIENT, 3.0)
    assert events(session) == [CandidatePairValidated(OTHER_CLIENT), Nominated(OTHER_CLIENT)]
    assert session.selected_address == OTHER_CLIENT and session.is_validated(CLIENT)


def test_ipv4_mapped_address_is_ipv4():
    session = new_session()
    response = session.receive_stun(request(use_candidate=True), ("::ffff:192.0.2.2", 59563), 0)
    assert stun.parse_message(response).attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert session.selected_address == CLIENT
    assert session.is_validated(("::ffff:192.0.2.2", 59563)) and session.is_validated(CLIENT)
    assert not session.is_validated(("192.0.2.2", 1)) and not session.is_validated(("x", 1))


def test_ipv6_address_is_canonical_and_scoped_tuple_accepted():
    session = new_session()
    response = session.receive_stun(request(), ("2001:DB8:0::7", 5000, 0, 0), 0.0)
    assert stun.parse_message(response).attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 5000)
    assert session.is_validated(("2001:db8::7", 5000))


def test_address_table_is_bounded_and_keeps_the_selected_address():
    session = new_session()
    session.receive_stun(request(use_candidate=True), CLIENT, 0.0)
    for port in range(1, MAX_VALIDATED_ADDRESSES + 5):
        session.receive_stun(request(), ("198.51.100.1", port), float(port))
    assert len(session.validated_addresses) == MAX_VALIDATED_ADDRESSES
    assert session.selected_address == CLIENT and session.is_validated(CLIENT)
    assert not session.is_validated(("198.51.100.1", 1))  # least recently checked: dropped


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        IceLiteSession("a:b", LOCAL_PWD, REMOTE_UFRAG, REMOTE_PWD)
    with pytest.raises(ValueError):
        IceLiteSession(LOCAL_UFRAG, LOCAL_PWD, "", REMOTE_PWD)
    with pytest.raises(ValueError):
        IceLiteSession(LOCAL_UFRAG, LOCAL_PWD, REMOTE_UFRAG, REMOTE_PWD, consent_timeout=0)


def test_bad_addr_is_a_caller_error():
    with pytest.raises(ValueError):
        new_session().receive_stun(request(), ("not-an-ip", 1), 0.0)
    with pytest.raises(ValueError):
        new_session().receive_stun(request(), ("192.0.2.1", 0), 0.0)


# --------------------------------------------------------------------------- consent


def test_checks_keep_consent_and_move_the_timer():
    session = new_session(consent_timeout=30.0)
    assert session.get_timer() is None
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0):
        session.receive_stun(request(use_candidate=True), CLIENT, now)
        assert session.get_timer() == now + 30.0
        session.handle_timer(now + 29.9)
        assert session.selected_address == CLIENT
    assert events(session) == [CandidatePairValidated(CLIENT), Nominated(CLIENT)]


def test_consent_expires_after_timeout_without_checks():
    session = new_session(consent_timeout=30.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 100.0)
    events(session)

    session.handle_timer(129.999)
    assert session.next_event() is None and session.is_validated(CLIENT)

    session.handle_timer(130.0)
    assert events(session) == [ConsentExpired(CLIENT)]
    assert session.selected_address is None and not session.is_validated(CLIENT)
    assert session.get_timer() is None

    session.handle_timer(200.0)
    assert session.next_event() is None  # reported once


def test_consent_expires_at_exactly_the_time_get_timer_asked_for():
    # 1000.1 + 30.0 - 30.0 rounds below 1000.1: the expiry must be the sum get_timer()
    # returns, or handle_timer at the due time does nothing and the timer stays due.
    session = new_session(consent_timeout=30.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 1000.1)
    events(session)
    due = session.get_timer()
    assert due == 1000.1 + 30.0

    session.handle_timer(due)
    assert events(session) == [ConsentExpired(CLIENT)]
    assert session.get_timer() is None


@settings(max_examples=300, deadline=None)
@given(
    last_check=st.floats(0.0, 1e9, allow_nan=False),
    consent_timeout=st.floats(0.001, 3600.0, allow_nan=False),
)
def test_handle_timer_at_its_timer_always_clears_it(last_check, consent_timeout):
    session = new_session(consent_timeout=consent_timeout)
    session.receive_stun(request(use_candidate=True), CLIENT, last_check)
    due = session.get_timer()
    assert due is not None
    session.handle_timer(due)
    assert session.get_timer() is None and not session.is_validated(CLIENT)


def test_rejected_checks_do_not_refresh_consent():
    session = new_session(consent_timeout=30.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 0.0)
    session.receive_stun(request(controlling=False), CLIENT, 20.0)  # 487
    session.receive_stun(request(key=b"wrong-password-wrong-password"), CLIENT, 25.0)  # 401
    assert session.get_timer() == 30.0
    session.handle_timer(30.0)
    assert ConsentExpired(CLIENT) in events(session)


def test_unselected_address_lapses_silently():
    session = new_session(consent_timeout=30.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 0.0)
    session.receive_stun(request(), OTHER_CLIENT, 1.0)
    events(session)
    session.receive_stun(request(), CLIENT, 20.0)
    assert session.get_timer() == 31.0  # OTHER_CLIENT's deadline comes first
    session.handle_timer(31.0)
    assert session.next_event() is None
    assert not session.is_validated(OTHER_CLIENT) and session.selected_address == CLIENT
    assert session.get_timer() == 50.0


def test_late_timer_is_caught_up_by_the_next_check():
    # The transceiver was late to call handle_timer: the stale address still expires
    # before the new check counts, so its return is reported as a fresh validation.
    session = new_session(consent_timeout=30.0)
    session.receive_stun(request(use_candidate=True), CLIENT, 0.0)
    events(session)
    session.receive_stun(request(use_candidate=True), CLIENT, 45.0)
    assert events(session) == [
        ConsentExpired(CLIENT),
        CandidatePairValidated(CLIENT),
        Nominated(CLIENT),
    ]


# --------------------------------------------------------- a real ICE agent over UDP


async def run_aioice_against_session(monkeypatch) -> tuple[IceLiteSession, tuple[str, int]]:
    """aioice's full ICE agent, as the controlling client, checks our ICE-lite session
    through a real loopback UDP socket until it has a nominated pair."""
    monkeypatch.setattr(aioice_ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    loop = asyncio.get_running_loop()

    client = AioiceConnection(ice_controlling=True, use_ipv6=False)
    session = IceLiteSession(
        "AQAHAAPK5mLw8Vx3bK9pQ2Rz", LOCAL_PWD, client.local_username, client.local_password
    )

    async def serve() -> None:
        while True:
            data, addr = await loop.sock_recvfrom(server, 2048)
            response = session.receive_stun(data, addr, loop.time())
            if response is not None:
                await loop.sock_sendto(server, response, addr)

    server_task = asyncio.create_task(serve())
    try:
        await client.gather_candidates()
        client.remote_username = session.local_ufrag
        client.remote_password = LOCAL_PWD
        client.remote_is_lite = True
        host, port = server.getsockname()
        await client.add_remote_candidate(
            AioiceCandidate(
                foundation="1",
                component=1,
                transport="udp",
                priority=2130706431,
                host=host,
                port=port,
                type="host",
            )
        )
        await client.add_remote_candidate(None)
        await asyncio.wait_for(client.connect(), timeout=10)
        server_task.cancel()  # from here on, read the socket here
        with contextlib.suppress(asyncio.CancelledError):
            await server_task
        await client.send(b"after ICE")  # data flows on the nominated pair
        data, client_address = await asyncio.wait_for(loop.sock_recvfrom(server, 2048), 5)
        assert data == b"after ICE"
        return session, client_address
    finally:
        server_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server_task
        await client.close()
        server.close()


def test_aioice_agent_connects_to_our_ice_lite_session(monkeypatch):
    session, client_address = asyncio.run(run_aioice_against_session(monkeypatch))
    assert session.selected_address == client_address
    assert session.is_validated(client_address)
    assert events(session) == [CandidatePairValidated(client_address), Nominated(client_address)]


# ------------------------------------------------------------------------------ fuzz


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_datagrams_never_raise(data):
    session = new_session()
    response = session.receive_stun(data, CLIENT, 0.0)
    assert response is None or stun.parse_message(response).message_class == stun.Class.ERROR
    assert not session.is_validated(CLIENT)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(
        [request(), request(use_candidate=True), chromium_request(CHROMIUM_REQUESTS[0])]
    ),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
    st.booleans(),
)
def test_fuzz_mutated_requests_only_get_valid_stun_back(data, flips, fix_fingerprint):
    mutated = bytearray(data)
    for position, value in flips:
        if position < len(mutated):
            mutated[position] = value
    if fix_fingerprint and len(mutated) >= 28:
        # Re-seal so the mutation reaches the attribute parser instead of stopping at
        # the FINGERPRINT check.
        crc = binascii.crc32(bytes(mutated[:-8])) ^ 0x5354554E
        mutated[-8:] = struct.pack("!HHI", 0x8028, 4, crc)
    session = new_session()
    response = session.receive_stun(bytes(mutated), CLIENT, 0.0)
    if response is not None:
        message = stun.parse_message(response)
        assert message.transaction_id == bytes(mutated[8:20])
        if message.message_class == stun.Class.RESPONSE:
            assert session.is_validated(CLIENT)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.booleans(), st.booleans()), max_size=30))
def test_fuzz_timers_and_checks_keep_invariants(steps):
    session = new_session(consent_timeout=10.0)
    now = 0.0
    for delay, is_check, nominate in steps:
        now += delay
        if is_check:
            session.receive_stun(request(use_candidate=nominate), CLIENT, now)
        else:
            session.handle_timer(now)
        timer = session.get_timer()
        assert (timer is None) == (not session.validated_addresses)
        assert timer is None or timer > now
        if session.selected_address is not None:
            assert session.is_validated(session.selected_address)
    kinds = [type(event) for event in events(session)]
    assert kinds.count(Nominated) - kinds.count(ConsentExpired) in (0, 1)


# ----------------------------------------------------------------------------- demux


def test_classify_follows_rfc_7983_ranges():
    expected = (["stun"] * 4 + ["other"] * 16 + ["dtls"] * 44 + ["other"] * 64 + ["rtp"] * 64) + [
        "other"
    ] * 64
    assert [classify(byte) for byte in range(256)] == expected


@pytest.mark.parametrize("byte", [-1, 256, 1000])
def test_classify_rejects_non_bytes(byte):
    with pytest.raises(ValueError):
        classify(byte)


def test_classify_real_datagrams():
    assert classify_datagram(chromium_request(CHROMIUM_REQUESTS[0])) == "stun"
    assert classify_datagram((DATA / "clienthello.bin").read_bytes()) == "dtls"
    rtp = struct.pack("!BBHII", 0x80, 111, 1, 960, 2242451026) + bytes(40)
    assert classify_datagram(rtp) == "rtp"
    rtcp_receiver_report = struct.pack("!BBHI", 0x81, 201, 7, 2242451026) + bytes(24)
    assert classify_datagram(memoryview(rtcp_receiver_report)) == "rtp"
    assert classify_datagram(b"") == "other"
    assert classify_datagram(bytes([0x40, 0x00])) == "other"  # TURN channel data
