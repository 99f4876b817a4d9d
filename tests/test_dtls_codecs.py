"""Record framing, replay window, handshake message codecs and reassembly, on real
Chromium bytes where they exist; every parser fuzzed for typed errors only."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.dtls import AlertDescription, DtlsDecodeError
from voxrelay.proto.dtls.errors import DtlsProtocolError
from voxrelay.proto.dtls.handshake import (
    MESSAGE_TYPES,
    Certificate,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    ClientKeyExchange,
    Finished,
    HandshakeFragment,
    HandshakeReassembler,
    HelloVerifyRequest,
    ServerHello,
    ServerHelloDone,
    ServerKeyExchange,
    encode_handshake_fragment,
    find_extension,
    parse_ec_point_formats,
    parse_handshake_body,
    parse_handshake_fragments,
    parse_renegotiation_info,
    parse_signature_algorithms,
    parse_supported_groups,
    parse_use_srtp,
)
from voxrelay.proto.dtls.record import (
    MAX_CIPHERTEXT_LENGTH,
    Record,
    ReplayWindow,
    encode_record,
    iter_records,
    parse_records,
)

DATA = Path(__file__).parent / "data"
CAPTURE = (DATA / "chromium156_clienthello.bin").read_bytes()
DECODED = json.loads((DATA / "chromium156_clienthello.json").read_text())


def chromium_fragments() -> list[tuple[Record, HandshakeFragment]]:
    out = []
    for datagram in (CAPTURE[:1200], CAPTURE[1200:]):
        for record in parse_records(datagram):
            out.extend((record, f) for f in parse_handshake_fragments(record.fragment))
    return out


def chromium_body() -> bytes:
    reassembler = HandshakeReassembler(max_message_size=4096)
    for record, fragment in chromium_fragments():
        reassembler.add(fragment, record.epoch)
    message = reassembler.pop()
    assert message is not None
    return message.body


# --- records ------------------------------------------------------------------------------


def test_chromium_records_match_the_decoded_capture():
    records = [r for datagram in (CAPTURE[:1200], CAPTURE[1200:]) for r in parse_records(datagram)]
    assert [
        (r.content_type, r.version, r.epoch, r.sequence_number, len(r.fragment)) for r in records
    ] == [
        (d["content_type"], d["version"], d["epoch"], d["seq"], d["length"])
        for d in DECODED["records"]
    ]
    assert b"".join(r.encode() for r in records) == CAPTURE


def test_several_records_in_one_datagram():
    datagram = encode_record(22, 0xFEFD, 0, 5, b"abc") + encode_record(
        23, 0xFEFD, 1, 2**48 - 1, b""
    )
    assert parse_records(datagram) == [
        Record(22, 0xFEFD, 0, 5, b"abc"),
        Record(23, 0xFEFD, 1, 2**48 - 1, b""),
    ]


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (b"\x16\xfe\xfd", "record header truncated: 3 bytes left at offset 0, a header needs 13"),
        (
            encode_record(22, 0xFEFD, 0, 0, b"ab")[:-1],
            "record at offset 0 claims 2 bytes, datagram has 1",
        ),
        (encode_record(22, 0x0303, 0, 0, b""), "record version 0x0303 is not a DTLS version"),
    ],
)
def test_malformed_records_raise_decode_error_with_exact_message(datagram, message):
    with pytest.raises(DtlsDecodeError) as raised:
        parse_records(datagram)
    assert raised.value.args[0] == message
    assert raised.value.alert is AlertDescription.DECODE_ERROR


def test_oversized_record_is_a_record_overflow():
    header = encode_record(23, 0xFEFD, 1, 0, b"")[:11] + (MAX_CIPHERTEXT_LENGTH + 1).to_bytes(
        2, "big"
    )
    with pytest.raises(DtlsProtocolError) as raised:
        parse_records(header)
    assert raised.value.alert is AlertDescription.RECORD_OVERFLOW


def test_records_before_a_malformed_one_are_still_yielded():
    good = encode_record(23, 0xFEFD, 1, 1, b"ok")
    iterator = iter_records(good + b"\x17\xfe")
    assert next(iterator).fragment == b"ok"
    with pytest.raises(DtlsDecodeError):
        next(iterator)


records = st.builds(
    Record,
    content_type=st.integers(0, 255),
    version=st.sampled_from([0xFEFF, 0xFEFD, 0xFEFC]),
    epoch=st.integers(0, 2**16 - 1),
    sequence_number=st.integers(0, 2**48 - 1),
    fragment=st.binary(max_size=64),
)


@given(st.lists(records, max_size=5))
def test_record_round_trip(generated):
    datagram = b"".join(r.encode() for r in generated)
    assert parse_records(datagram) == generated


@settings(max_examples=500)
@given(st.binary(max_size=100))
def test_fuzzed_record_parsing_raises_only_typed_errors(data):
    with contextlib.suppress(DtlsProtocolError):
        parse_records(data)


# --- replay window ------------------------------------------------------------------------


def test_replay_window_accepts_each_sequence_number_once():
    window = ReplayWindow()
    for seq in (0, 2, 1, 70, 10, 69):
        assert not window.is_replay(seq)
        window.accept(seq)
        assert window.is_replay(seq)
    assert window.is_replay(6)  # 70 - 64: fell out of the window
    assert not window.is_replay(7)
    window.accept(1000)
    assert window.is_replay(70) and not window.is_replay(999) and not window.is_replay(2000)


def test_replay_window_survives_a_jump_to_the_last_sequence_number():
    window = ReplayWindow()
    window.accept(3)
    window.accept(2**48 - 1)
    assert window.is_replay(2**48 - 1) and window.is_replay(3)
    assert not window.is_replay(2**48 - 2)


@given(st.lists(st.integers(0, 300) | st.integers(0, 2**48 - 1), max_size=80))
def test_replay_window_matches_a_reference_model(sequence):
    window = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    for seq in sequence:
        expected = seq in seen or (highest >= 0 and seq <= highest - 64)
        assert window.is_replay(seq) == expected
        if not expected:
            window.accept(seq)
            seen.add(seq)
            highest = max(highest, seq)


# --- handshake messages -------------------------------------------------------------------


def test_chromium_client_hello_fragments_match_the_decoded_capture():
    fragments = [f for _, f in chromium_fragments()]
    expected = [
        fragment for record in DECODED["records"] for fragment in record["handshake_fragments"]
    ]
    assert [
        (f.msg_type, f.length, f.message_seq, f.fragment_offset, f.fragment_length)
        for f in fragments
    ] == [
        (e["msg_type"], e["length"], e["message_seq"], e["frag_offset"], e["frag_length"])
        for e in expected
    ]


def test_chromium_client_hello_decodes_field_by_field_and_round_trips():
    body = chromium_body()
    hello = ClientHello.parse(body)
    decoded = DECODED["client_hello"]
    assert hello.encode() == body
    assert hello.client_version == 0xFEFD
    assert hello.random.hex() == decoded["random"]
    assert hello.session_id == b"" and hello.cookie == b""
    assert [int(s.split()[0], 16) for s in decoded["cipher_suites"]] == list(hello.cipher_suites)
    assert [kind for kind, _ in hello.extensions] == [e["type"] for e in decoded["extensions"]]
    assert parse_supported_groups(find_extension(hello.extensions, 10)) == (0x11EC, 29, 23, 24)
    assert parse_signature_algorithms(find_extension(hello.extensions, 13))[0] == 0x0403
    assert parse_use_srtp(find_extension(hello.extensions, 14)) == ((0x0001, 0x0008, 0x0007), b"")
    assert parse_ec_point_formats(find_extension(hello.extensions, 11)) == b"\x00"
    assert parse_renegotiation_info(find_extension(hello.extensions, 0xFF01)) == b""
    assert find_extension(hello.extensions, 23) == b""


MESSAGES = [
    ClientHello(
        0xFEFD,
        bytes(range(32)),
        b"sid",
        b"cookie",
        (0xC02B, 0xCCA9),
        b"\x00",
        ((23, b""), (14, b"\x00\x02\x00\x07\x00")),
    ),
    ClientHello(0xFEFD, bytes(32), cipher_suites=(0xC02B,)),
    HelloVerifyRequest(0xFEFF, bytes(32)),
    ServerHello(0xFEFD, bytes(32), b"", 0xC02B, 0, ((0xFF01, b"\x00"),)),
    ServerHello(0xFEFD, bytes(32), b"", 0xC02B),
    Certificate((b"leaf", b"issuer")),
    Certificate(()),
    ServerKeyExchange(29, bytes(32), 0x0403, b"sig"),
    CertificateRequest(b"\x40\x01", (0x0403, 0x0804), (b"CN=x",)),
    ServerHelloDone(),
    ClientKeyExchange(b"\x04" + bytes(64)),
    CertificateVerify(0x0403, b"signature"),
    Finished(bytes(12)),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message):
    assert parse_handshake_body(message.msg_type, message.encode()) == message


@pytest.mark.parametrize(
    ("message_class", "body", "text"),
    [
        (Finished, bytes(11), "Finished verify_data is 11 bytes, expected 12"),
        (ServerHelloDone, b"x", "ServerHelloDone has 1 unexpected trailing bytes"),
        (
            HelloVerifyRequest,
            b"\xfe\xff\x05ab",
            "HelloVerifyRequest is truncated: needs 5 more bytes at offset 3, has 2",
        ),
        (ClientKeyExchange, b"\x00", "ClientKeyExchange: vector length 0 outside <1>"),
        (Certificate, b"\x00\x00\x03\x00\x00\x00", "Certificate list: vector length 0 outside <1>"),
        (
            CertificateRequest,
            b"\x01\x40\x00\x01\x04\x00\x00",
            "CertificateRequest: list of uint16 has odd length 1",
        ),
    ],
)
def test_malformed_messages_raise_exact_decode_errors(message_class, body, text):
    with pytest.raises(DtlsDecodeError) as raised:
        message_class.parse(body)
    assert raised.value.args[0] == text


def test_server_key_exchange_needs_a_named_curve():
    with pytest.raises(DtlsProtocolError) as raised:
        ServerKeyExchange.parse(b"\x01\x00\x17")
    assert raised.value.alert is AlertDescription.ILLEGAL_PARAMETER


def test_unknown_handshake_type_is_unexpected():
    with pytest.raises(DtlsProtocolError) as raised:
        parse_handshake_body(4, b"")
    assert raised.value.alert is AlertDescription.UNEXPECTED_MESSAGE
    assert "0x0004 is not supported" in str(raised.value)


@settings(max_examples=200)
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.binary(max_size=120))
def test_fuzzed_message_bodies_raise_only_typed_errors(msg_type, body):
    with contextlib.suppress(DtlsProtocolError):
        parse_handshake_body(msg_type, body)


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_fuzzed_fragment_headers_raise_only_typed_errors(data):
    with contextlib.suppress(DtlsProtocolError):
        parse_handshake_fragments(data)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 1412), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_chromium_client_hello_parses_or_raises_typed_errors(mutations):
    body = bytearray(chromium_body())
    for offset, value in mutations:
        body[offset] = value
    with contextlib.suppress(DtlsProtocolError):
        ClientHello.parse(bytes(body))


# --- reassembly ---------------------------------------------------------------------------


def fragments_of(msg_type: int, seq: int, body: bytes, size: int) -> list[HandshakeFragment]:
    return [
        HandshakeFragment(msg_type, len(body), seq, offset, body[offset : offset + size])
        for offset in range(0, max(len(body), 1), size)
    ]


@given(st.randoms(use_true_random=False), st.integers(1, 50))
def test_reassembly_in_any_order_with_duplicates_and_overlaps(rng: random.Random, size):
    body = bytes(range(256)) * 2
    pieces = fragments_of(11, 0, body, size) + fragments_of(11, 0, body[3:], size + 7)
    pieces = [
        HandshakeFragment(p.msg_type, len(body), 0, p.fragment_offset, p.body)
        for p in pieces[: len(pieces) // 2 + 1]
    ] + fragments_of(11, 0, body, size)
    pieces += rng.sample(pieces, k=len(pieces) // 3)
    rng.shuffle(pieces)
    reassembler = HandshakeReassembler(max_message_size=4096)
    delivered = []
    for piece in pieces:
        reassembler.add(piece, 0)
        while (message := reassembler.pop()) is not None:
            delivered.append(message)
    assert [(m.msg_type, m.message_seq, m.body) for m in delivered] == [(11, 0, body)]


def test_messages_are_delivered_in_sequence_order():
    reassembler = HandshakeReassembler(max_message_size=100)
    reassembler.add(HandshakeFragment(14, 0, 1, 0, b""), 0)
    assert reassembler.pop() is None  # message 0 still missing
    reassembler.add(HandshakeFragment(11, 2, 0, 0, b"ab"), 0)
    assert [reassembler.pop().msg_type, reassembler.pop().msg_type] == [11, 14]
    assert reassembler.pop() is None and reassembler.next_seq == 2


def test_fragments_that_disagree_are_an_illegal_parameter():
    reassembler = HandshakeReassembler(max_message_size=100)
    reassembler.add(HandshakeFragment(11, 10, 0, 0, b"abc"), 0)
    with pytest.raises(DtlsProtocolError) as raised:
        reassembler.add(HandshakeFragment(11, 12, 0, 3, b"def"), 0)
    assert raised.value.alert is AlertDescription.ILLEGAL_PARAMETER


def test_authenticated_fragments_replace_a_plaintext_partial_message():
    reassembler = HandshakeReassembler(max_message_size=100)
    reassembler.add(HandshakeFragment(20, 12, 0, 0, b"forged"), 0)
    reassembler.add(HandshakeFragment(20, 12, 0, 0, b"real verify!"), 1)
    reassembler.add(HandshakeFragment(20, 12, 0, 6, b"ignored"[:6]), 0)
    message = reassembler.pop()
    assert (message.epoch, message.body) == (1, b"real verify!")


def test_oversized_message_is_refused_before_buffering():
    reassembler = HandshakeReassembler(max_message_size=100)
    with pytest.raises(DtlsProtocolError, match="exceeds the 100-byte limit"):
        reassembler.add(HandshakeFragment(11, 101, 0, 0, b""), 0)


def test_fragments_far_ahead_and_behind_are_ignored():
    reassembler = HandshakeReassembler(max_message_size=100, lookahead=4)
    reassembler.add(HandshakeFragment(11, 1, 4, 0, b"x"), 0)
    reassembler.reset(5)
    reassembler.add(HandshakeFragment(11, 1, 4, 0, b"x"), 0)
    assert reassembler.pop() is None


def test_fragment_encoding_matches_the_wire_layout():
    assert (
        encode_handshake_fragment(1, 1413, 0, 1175, b"xy")
        == bytes.fromhex("01 000585 0000 000497 000002") + b"xy"
    )
