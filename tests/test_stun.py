"""The relay worker's STUN reader: recognising STUN (RFC 7983, RFC 8489) and reading the
USERNAME of real and synthetic binding requests from a receive buffer, with StunError as
the only error that malformed input can raise."""

import binascii
import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.stun import (
    BINDING_REQUEST,
    MAX_USERNAME_LENGTH,
    STUN_MAGIC_COOKIE,
    USERNAME,
    StunError,
    is_stun,
    read_username,
    server_ufrag,
    split_username,
)

CHROMIUM_REQUESTS = Path(__file__).parent / "data" / "chromium-156" / "stun_requests.json"
TRANSACTION_ID = bytes.fromhex("482b695235624459584b674b")
PRIORITY = 0x0024
FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E
BINDING_SUCCESS_RESPONSE = 0x0101
BINDING_INDICATION = 0x0011


def stun_message(
    attributes: list[tuple[int, bytes]],
    message_type: int = BINDING_REQUEST,
    transaction_id: bytes = TRANSACTION_ID,
) -> bytes:
    """Encode a STUN message: 20-byte header, then attributes zero-padded to 4 bytes."""
    body = b"".join(
        struct.pack("!HH", attribute_type, len(value)) + value + bytes(-len(value) % 4)
        for attribute_type, value in attributes
    )
    return struct.pack("!HHI12s", message_type, len(body), STUN_MAGIC_COOKIE, transaction_id) + (
        body
    )


def with_fingerprint(message_without_fingerprint: bytes) -> bytes:
    """Append FINGERPRINT (RFC 8489 section 14.7) with the length field covering it."""
    data = bytearray(message_without_fingerprint)
    struct.pack_into("!H", data, 2, len(data) - 20 + 8)
    crc = binascii.crc32(data) ^ FINGERPRINT_XOR
    return bytes(data) + struct.pack("!HHI", FINGERPRINT, 4, crc)


def chromium_request_bytes(record: dict) -> bytes:
    """Rebuild the exact datagram of one captured Chromium binding request."""
    attributes = []
    for attribute in record["attributes"]:
        if attribute["name"] == "USERNAME":
            value = attribute["value"].encode("utf-8")
        elif attribute["name"] == "PRIORITY":
            value = struct.pack("!I", attribute["value"])
        else:
            value = bytes.fromhex(attribute["value"])
        assert len(value) == attribute["len"]
        attributes.append((int(attribute["type"], 16), value))
    return stun_message(attributes, transaction_id=bytes.fromhex(record["transaction_id"]))


def chromium_records() -> list[dict]:
    return json.loads(CHROMIUM_REQUESTS.read_text())


def aioice_binding_request(username: str, use_candidate: bool = True) -> bytes:
    """A complete ICE connectivity check as aioice would send it."""
    message = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TRANSACTION_ID,
    )
    message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1853832447
    message.attributes["ICE-CONTROLLING"] = 0x9D781643BE5F244D
    if use_candidate:
        message.attributes["USE-CANDIDATE"] = None
    message.add_message_integrity(b"server-ice-password-24chars")
    return bytes(message)


def in_receive_buffer(datagram: bytes, fill: int = 0xEE) -> memoryview:
    """The datagram at the start of a preallocated receive buffer with stale bytes after."""
    buffer = bytearray([fill]) * 2048
    buffer[: len(datagram)] = datagram
    return memoryview(buffer)


CHECK = stun_message([(USERNAME, b"ilfv:1Zid"), (PRIORITY, b"\x6e\x7f\x7f\xff")])


# Real bytes from Chromium


@pytest.mark.parametrize("record", chromium_records(), ids=lambda record: record["src"])
def test_chromium_requests_rebuild_exactly_and_yield_their_username(record: dict) -> None:
    datagram = chromium_request_bytes(record)
    assert len(datagram) == 20 + record["length"]
    # FINGERPRINT is a CRC over every preceding byte: it proves the rebuild is exact.
    (captured_crc,) = struct.unpack("!I", bytes.fromhex(record["attributes"][-1]["value"]))
    assert binascii.crc32(datagram[:-8]) ^ FINGERPRINT_XOR == captured_crc

    assert is_stun(datagram, len(datagram))
    assert read_username(datagram, len(datagram)) == b"ilfv:1Zid"
    assert server_ufrag(datagram, len(datagram)) == b"ilfv"
    assert server_ufrag(in_receive_buffer(datagram), len(datagram)) == b"ilfv"


def test_aioice_parses_the_rebuilt_chromium_request_the_same_way() -> None:
    datagram = chromium_request_bytes(chromium_records()[0])
    parsed = aioice_stun.parse_message(datagram)
    assert parsed.attributes["USERNAME"].encode() == read_username(datagram, len(datagram))


# Synthetic but complete ICE checks


@pytest.mark.parametrize("use_candidate", [True, False])
def test_an_aioice_connectivity_check_yields_its_username(use_candidate: bool) -> None:
    datagram = aioice_binding_request("FAAHAAP2kirbgZnVZ3DhoQ60:1Zid", use_candidate)
    assert read_username(datagram, len(datagram)) == b"FAAHAAP2kirbgZnVZ3DhoQ60:1Zid"
    assert server_ufrag(datagram, len(datagram)) == b"FAAHAAP2kirbgZnVZ3DhoQ60"


def test_username_after_other_attributes_is_found() -> None:
    datagram = stun_message(
        [(PRIORITY, b"\x00\x00\x00\x01"), (0x8022, b"odd"), (0xC057, b""), (USERNAME, b"a:b")]
    )
    assert read_username(datagram, len(datagram)) == b"a:b"


def test_the_first_username_wins() -> None:
    datagram = stun_message([(USERNAME, b"first:x"), (USERNAME, b"second:y")])
    assert read_username(datagram, len(datagram)) == b"first:x"


def test_a_username_of_513_bytes_is_accepted() -> None:
    username = b"u" * 256 + b":" + b"c" * 256
    datagram = stun_message([(USERNAME, username)])
    assert MAX_USERNAME_LENGTH == 513
    assert read_username(datagram, len(datagram)) == username


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_every_buffer_type_returns_bytes(buffer_type: type) -> None:
    value = read_username(buffer_type(CHECK), len(CHECK))
    assert type(value) is bytes
    assert value == b"ilfv:1Zid"


def test_reading_copies_only_the_username_never_the_message() -> None:
    # 60 kB of attribute before the USERNAME: any copy of the message would show up.
    datagram = stun_message([(0x8001, bytes(60_000)), (USERNAME, b"server:client")])
    buffer = memoryview(bytearray(datagram) + bytearray(1000))
    read_username(buffer, len(datagram))  # warm up any lazy imports or caches
    tracemalloc.start()
    try:
        value = read_username(buffer, len(datagram))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == b"server:client"
    assert peak < 2_000


# is_stun: RFC 7983 demultiplexing plus the STUN header checks


def test_is_stun_accepts_a_binding_request() -> None:
    assert is_stun(CHECK, len(CHECK))
    assert is_stun(in_receive_buffer(CHECK), len(CHECK))


def test_is_stun_accepts_trailing_bytes_after_the_message() -> None:
    assert is_stun(CHECK + b"\x00" * 8, len(CHECK) + 8)


def test_is_stun_accepts_a_header_only_message() -> None:
    assert is_stun(stun_message([]), 20)


@pytest.mark.parametrize(
    ("first_byte", "protocol"),
    [(20, "DTLS"), (23, "DTLS"), (63, "DTLS"), (64, "TURN channel"), (0x80, "RTP"), (0xFF, "?")],
)
def test_is_stun_rejects_other_protocols_by_first_byte(first_byte: int, protocol: str) -> None:
    datagram = bytes([first_byte]) + CHECK[1:]
    assert not is_stun(datagram, len(datagram)), protocol


@pytest.mark.parametrize("first_byte", [0, 1, 2, 3])
def test_is_stun_accepts_first_bytes_0_to_3(first_byte: int) -> None:
    datagram = bytes([first_byte]) + CHECK[1:]
    assert is_stun(datagram, len(datagram))


def test_is_stun_rejects_a_wrong_magic_cookie() -> None:
    datagram = CHECK[:4] + b"\x21\x12\xa4\x43" + CHECK[8:]
    assert not is_stun(datagram, len(datagram))


@pytest.mark.parametrize("length", range(20))
def test_is_stun_rejects_anything_shorter_than_a_header(length: int) -> None:
    assert not is_stun(CHECK[:length], length)
    assert not is_stun(CHECK, length)


@pytest.mark.parametrize("declared", [1, 2, 3, 5, 18])
def test_is_stun_rejects_a_message_length_not_a_multiple_of_4(declared: int) -> None:
    datagram = CHECK[:2] + struct.pack("!H", declared) + CHECK[4:]
    assert not is_stun(datagram, len(datagram))


def test_is_stun_rejects_a_message_longer_than_the_datagram() -> None:
    assert not is_stun(CHECK, len(CHECK) - 4)


def test_is_stun_never_trusts_stale_bytes_after_the_datagram() -> None:
    # A full message sits in the buffer from an earlier datagram; the new datagram is its
    # first 24 bytes. Judging by the buffer instead of `length` would accept it.
    buffer = in_receive_buffer(CHECK)
    assert not is_stun(buffer, 24)
    with pytest.raises(StunError, match="runs past the 24-byte datagram"):
        read_username(buffer, 24)


@pytest.mark.parametrize("length", [-1, -20, len(CHECK) + 1, 10**9])
def test_is_stun_rejects_a_length_outside_the_buffer(length: int) -> None:
    assert not is_stun(CHECK, length)
    with pytest.raises(StunError, match="outside the"):
        read_username(CHECK, length)


# read_username: one precise error per defect


def test_stun_error_is_a_protocol_error() -> None:
    assert issubclass(StunError, ProtocolError)


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (CHECK[:19], "shorter than a STUN header"),
        (b"\x80" + CHECK[1:], "first byte 128 is not 0..3"),
        (b"\x16\xfe\xfd" + CHECK[3:], "first byte 22 is not 0..3"),
        (CHECK[:4] + bytes(4) + CHECK[8:], "magic cookie 0x00000000 is not 0x2112a442"),
        (CHECK[:2] + b"\x00\x02" + CHECK[4:], "message length 2 is not a multiple of 4"),
        (CHECK[:-4], r"message length 24 runs past the 40-byte datagram \(needs 44\)"),
    ],
    ids=["short", "rtp", "dtls", "cookie", "unaligned", "overlong"],
)
def test_read_username_says_why_a_datagram_is_not_stun(datagram: bytes, message: str) -> None:
    with pytest.raises(StunError, match=message):
        read_username(datagram, len(datagram))


@pytest.mark.parametrize(
    "message_type", [BINDING_SUCCESS_RESPONSE, BINDING_INDICATION, 0x0111, 0x0003]
)
def test_read_username_rejects_anything_but_a_binding_request(message_type: int) -> None:
    datagram = stun_message([(USERNAME, b"a:b")], message_type=message_type)
    with pytest.raises(StunError, match=f"type 0x{message_type:04x} is not a binding request"):
        read_username(datagram, len(datagram))


@pytest.mark.parametrize(("declared", "attribute_type"), [(9, USERNAME), (13, PRIORITY)])
def test_read_username_rejects_an_attribute_running_past_the_message(
    declared: int, attribute_type: int
) -> None:
    # 8 bytes of attribute space; the attribute claims more.
    datagram = stun_message([(attribute_type, b"abcd")])
    datagram = datagram[:22] + struct.pack("!H", declared) + datagram[24:]
    with pytest.raises(
        StunError,
        match=rf"attribute 0x{attribute_type:04x} at offset 20 declares {declared} bytes, "
        "running past the end of the message at 28",
    ):
        read_username(datagram, len(datagram))


def test_read_username_rejects_a_message_without_username() -> None:
    datagram = stun_message([(PRIORITY, b"\x00\x00\x00\x01"), (0x8029, bytes(8))])
    with pytest.raises(StunError, match="has no USERNAME attribute"):
        read_username(datagram, len(datagram))


def test_read_username_ignores_a_username_after_the_message_length() -> None:
    # The header says the message ends after PRIORITY; the USERNAME after it is not part of
    # the message, so it must not be read even though it is inside the datagram.
    message = stun_message([(PRIORITY, b"\x00\x00\x00\x01")])
    trailer = stun_message([(USERNAME, b"smuggled:x")])[20:]
    datagram = message + trailer
    assert is_stun(datagram, len(datagram))
    with pytest.raises(StunError, match="has no USERNAME attribute"):
        read_username(datagram, len(datagram))


def test_read_username_rejects_an_empty_username() -> None:
    datagram = stun_message([(USERNAME, b"")])
    with pytest.raises(StunError, match="USERNAME is empty"):
        read_username(datagram, len(datagram))


def test_read_username_rejects_a_username_longer_than_513_bytes() -> None:
    datagram = stun_message([(USERNAME, b"u" * 514)])
    with pytest.raises(StunError, match="USERNAME is 514 bytes, longer than the 513"):
        read_username(datagram, len(datagram))


# split_username and server_ufrag


@pytest.mark.parametrize(
    ("value", "halves"),
    [
        (b"ilfv:1Zid", (b"ilfv", b"1Zid")),
        (b"s:c", (b"s", b"c")),
        (b"s:c:d", (b"s", b"c:d")),
        (b"FAAHAAP2kirbgZnVZ3DhoQ60:ab+/", (b"FAAHAAP2kirbgZnVZ3DhoQ60", b"ab+/")),
    ],
)
def test_split_username_splits_on_the_first_colon(
    value: bytes, halves: tuple[bytes, bytes]
) -> None:
    assert split_username(value) == halves


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"ilfv1Zid", "has no ':'"),
        (b":1Zid", "empty server ufrag"),
        (b"ilfv:", "empty client ufrag"),
        (b":", "empty server ufrag"),
    ],
)
def test_split_username_rejects_a_username_without_two_halves(value: bytes, message: str) -> None:
    with pytest.raises(StunError, match=message):
        split_username(value)


def test_server_ufrag_rejects_a_username_without_a_colon() -> None:
    datagram = stun_message([(USERNAME, b"nocolon")])
    with pytest.raises(StunError, match="has no ':'"):
        server_ufrag(datagram, len(datagram))


# Fuzzing: only StunError escapes, and what is read is what was written

other_attributes = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF).filter(lambda attribute_type: attribute_type != USERNAME),
        st.binary(max_size=24),
    ),
    max_size=5,
)


def _read_or_reject(data: bytes | bytearray | memoryview, length: int) -> bytes | None:
    """read_username, letting only StunError through as a rejection."""
    try:
        return read_username(data, length)
    except StunError:
        return None


@given(
    before=other_attributes,
    after=other_attributes,
    username=st.binary(min_size=1, max_size=MAX_USERNAME_LENGTH),
    trailing=st.binary(max_size=8),
)
def test_any_binding_request_yields_the_username_it_was_built_with(
    before: list[tuple[int, bytes]],
    after: list[tuple[int, bytes]],
    username: bytes,
    trailing: bytes,
) -> None:
    datagram = stun_message([*before, (USERNAME, username), *after])
    assert read_username(datagram, len(datagram)) == username
    assert read_username(in_receive_buffer(datagram + trailing), len(datagram)) == username


@settings(max_examples=500)
@given(data=st.binary(max_size=80), slack=st.integers(-25, 5))
def test_random_bytes_raise_only_stun_error(data: bytes, slack: int) -> None:
    length = len(data) + slack
    stun = is_stun(data, length)
    assert isinstance(stun, bool)
    value = _read_or_reject(data, length)
    assert value is None or stun


@settings(max_examples=300)
@given(body=st.binary(max_size=64), message_type=st.sampled_from([BINDING_REQUEST, 0x0101]))
def test_random_attributes_behind_a_valid_header_raise_only_stun_error(
    body: bytes, message_type: int
) -> None:
    body += bytes(-len(body) % 4)
    datagram = struct.pack("!HHI12s", message_type, len(body), STUN_MAGIC_COOKIE, bytes(12)) + (
        body
    )
    value = _read_or_reject(datagram, len(datagram))
    if value is not None:
        assert 1 <= len(value) <= MAX_USERNAME_LENGTH
        assert value in body


@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(CHECK) - 1), st.integers(0, 255)), min_size=1, max_size=4
    )
)
def test_mutated_requests_raise_only_stun_error(edits: list[tuple[int, int]]) -> None:
    datagram = bytearray(chromium_request_bytes(chromium_records()[0]))
    for offset, value in edits:
        datagram[offset % len(datagram)] = value
    buffer = in_receive_buffer(bytes(datagram))
    value = _read_or_reject(buffer, len(datagram))
    if value is not None:
        assert value in datagram


@given(username=st.binary(min_size=1, max_size=40), fill=st.integers(0, 255))
def test_every_truncation_is_rejected(username: bytes, fill: int) -> None:
    datagram = with_fingerprint(
        stun_message([(PRIORITY, b"\x00\x00\x00\x01"), (USERNAME, username)])
    )
    for length in range(len(datagram)):
        with pytest.raises(StunError):
            read_username(datagram[:length], length)
        with pytest.raises(StunError):
            read_username(in_receive_buffer(datagram, fill), length)


@given(username=st.binary(min_size=1, max_size=40))
def test_every_truncation_with_a_consistent_length_field_raises_only_stun_error(
    username: bytes,
) -> None:
    # Cut at each 4-byte boundary and fix the length field, so the header stays valid and
    # the attribute walk itself meets the cut.
    datagram = aioice_binding_request("server:" + username.hex())
    for length in range(20, len(datagram), 4):
        truncated = bytearray(datagram[:length])
        struct.pack_into("!H", truncated, 2, length - 20)
        value = _read_or_reject(truncated, length)
        assert value is None or value == ("server:" + username.hex()).encode()
