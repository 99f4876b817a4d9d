"""RTP packets (RFC 3550 section 5, RFC 8285 header extensions), checked against hand-laid
bytes, aiortc as an independent peer and real SRTP; receive statistics of RFC 3550
Appendix A; NTP and RTP clocks for sender reports; RtpError as the only parse error."""

import contextlib
import struct

import pylibsrtp
import pytest
from aiortc import rtp as aiortc_rtp
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.rtcp import ReceiverReport, ReportBlock, build_receiver_report, parse_rtcp
from voxrelay.proto.rtp import (
    MAX_DROPOUT,
    MAX_MISORDER,
    ONE_BYTE_PROFILE,
    RtpError,
    RtpPacket,
    SenderClock,
    SequenceTracker,
    build_rtp,
    ntp_middle32,
    ntp_timestamp,
    parse_header_extensions,
    parse_rtp,
    rtp_sequence,
    rtp_ssrc,
)

OPUS = 111
OPUS_RATE = 48_000
FRAME = 960  # 20 ms at 48 kHz

# An Opus packet laid out by hand the way Chromium sends one, with the four header
# extensions of its offer (tests/data/chromium-156/offer.sdp): 1 ssrc-audio-level,
# 2 abs-send-time, 3 transport-wide-cc, 4 sdes:mid.
CHROMIUM_STYLE_OPUS = bytes.fromhex(
    "90"  # V=2 P=0 X=1 CC=0
    "ef"  # M=1 PT=111
    "5a3c"  # sequence number
    "9c4a1f80"  # timestamp
    "3cbbc3e1"  # SSRC
    "bede 0003"  # one-byte extension profile, 3 words
    "10 9e"  # id 1, 1 byte: voice activity, level 30 (-30 dBov)
    "22 4b2a10"  # id 2, 3 bytes: abs-send-time
    "31 0007"  # id 3, 2 bytes: transport-wide sequence number 7
    "40 30"  # id 4, 1 byte: mid "0"
    "00"  # padding to the word boundary
    "780be4c136ecc58d"  # Opus payload
)
CHROMIUM_EXTENSION_URIS = {
    1: "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    2: "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    3: "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    4: "urn:ietf:params:rtp-hdrext:sdes:mid",
}

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


def aiortc_extension_map() -> aiortc_rtp.HeaderExtensionsMap:
    extension_map = aiortc_rtp.HeaderExtensionsMap()
    extension_map.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=i, uri=uri)
                for i, uri in CHROMIUM_EXTENSION_URIS.items()
            ]
        )
    )
    return extension_map


def with_extension(profile: int, block: bytes, payload: bytes = b"\x01\x02") -> bytes:
    """A minimal packet carrying ``block`` (already a whole number of words) as its extension."""
    return (
        struct.pack("!BBHII", 0x90, OPUS, 1, 2, 3)
        + struct.pack("!HH", profile, len(block) // 4)
        + block
        + payload
    )


# --- parsing known bytes ---------------------------------------------------------------


def test_parses_a_chromium_style_opus_packet_field_by_field() -> None:
    packet = parse_rtp(CHROMIUM_STYLE_OPUS)
    assert packet == RtpPacket(
        payload_type=OPUS,
        sequence_number=0x5A3C,
        timestamp=0x9C4A1F80,
        ssrc=0x3CBBC3E1,
        payload=bytes.fromhex("780be4c136ecc58d"),
        marker=True,
        csrc=(),
        extension_profile=ONE_BYTE_PROFILE,
        extension_data=bytes.fromhex("109e224b2a1031000740 3000"),
        padding_size=0,
    )
    assert packet.header_extensions() == [
        (1, b"\x9e"),
        (2, b"\x4b\x2a\x10"),
        (3, b"\x00\x07"),
        (4, b"0"),
    ]


def test_serialize_reproduces_parsed_bytes_exactly() -> None:
    assert parse_rtp(CHROMIUM_STYLE_OPUS).serialize() == CHROMIUM_STYLE_OPUS


def test_csrc_list_and_padding_follow_the_rfc_layout() -> None:
    data = (
        bytes.fromhex("a2 00 0001 00000002 00000003")  # P=1, CC=2, PT 0
        + bytes.fromhex("0000000a 0000000b")  # two CSRCs
        + b"audio"
        + bytes.fromhex("000003")  # three bytes of padding, counted by the last
    )
    packet = parse_rtp(data)
    assert packet.csrc == (10, 11)
    assert packet.payload == b"audio"
    assert packet.padding_size == 3
    assert packet.marker is False
    assert packet.serialize() == data


def test_padding_may_fill_everything_after_the_header() -> None:
    data = bytes.fromhex("a0 6f 0001 00000002 00000003") + bytes.fromhex("00000004")
    packet = parse_rtp(data)
    assert packet.payload == b""
    assert packet.padding_size == 4


def test_extension_with_zero_words_is_kept_apart_from_no_extension() -> None:
    packet = parse_rtp(with_extension(ONE_BYTE_PROFILE, b""))
    assert packet.extension_profile == ONE_BYTE_PROFILE
    assert packet.extension_data == b""
    assert packet.header_extensions() == []
    assert packet.serialize() == with_extension(ONE_BYTE_PROFILE, b"")


def test_memoryview_input_gives_views_into_the_same_buffer() -> None:
    buffer = bytearray(2048)
    buffer[: len(CHROMIUM_STYLE_OPUS)] = CHROMIUM_STYLE_OPUS
    packet = parse_rtp(memoryview(buffer)[: len(CHROMIUM_STYLE_OPUS)])
    assert isinstance(packet.payload, memoryview)
    assert packet.payload.obj is buffer
    assert packet.payload == bytes.fromhex("780be4c136ecc58d")
    assert packet.header_extensions()[3] == (4, b"0")
    assert packet.serialize() == CHROMIUM_STYLE_OPUS


def test_bytearray_input_gives_bytes_the_caller_may_reuse_the_buffer() -> None:
    buffer = bytearray(CHROMIUM_STYLE_OPUS)
    packet = parse_rtp(buffer)
    buffer[-8:] = bytes(8)
    assert packet.payload == bytes.fromhex("780be4c136ecc58d")


# --- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated: 0 bytes"),
        (bytes.fromhex("80 6f 0001 00000002 000000"), "truncated: 11 bytes"),
        (bytes.fromhex("40 6f 0001 00000002 00000003"), "version is 1"),
        (bytes.fromhex("00 6f 0001 00000002 00000003"), "version is 0"),
        (bytes.fromhex("c0 6f 0001 00000002 00000003"), "version is 3"),
        (bytes.fromhex("82 6f 0001 00000002 00000003 0000000a"), "2 CSRCs need 20"),
        (bytes.fromhex("8f 6f 0001 00000002 00000003") + bytes(56), "15 CSRCs need 72"),
        (bytes.fromhex("90 6f 0001 00000002 00000003 bede"), "no 4-byte extension header"),
        (bytes.fromhex("90 6f 0001 00000002 00000003 bede0002 10ff0000"), "declares 2 words"),
        (bytes.fromhex("a0 6f 0001 00000002 00000003 0102 00"), "padding count is 0"),
        (bytes.fromhex("a0 6f 0001 00000002 00000003 0102 04"), "count 4 exceeds the 3"),
        (bytes.fromhex("a0 6f 0001 00000002 0000000d"), "count 13 exceeds the 0"),
        (
            bytes.fromhex("b0 6f 0001 00000002 00000003 bede0001 10ff0000 06"),
            "count 6 exceeds the 1",
        ),
    ],
)
def test_malformed_packets_raise_rtp_error_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(RtpError, match=message):
        parse_rtp(data)


def test_rtp_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_rtp(b"\x80")
    assert issubclass(RtpError, ValueError)


# --- RFC 8285 header extensions --------------------------------------------------------


def test_one_byte_elements_skip_padding_between_them() -> None:
    block = bytes.fromhex("10 9e 00 00 21 abcd 00")
    assert parse_header_extensions(ONE_BYTE_PROFILE, block) == [(1, b"\x9e"), (2, b"\xab\xcd")]


def test_one_byte_element_can_be_sixteen_bytes_long() -> None:
    block = bytes.fromhex("5f") + bytes(range(16)) + bytes(3)
    assert parse_header_extensions(ONE_BYTE_PROFILE, block) == [(5, bytes(range(16)))]


def test_one_byte_id_15_ends_processing_as_rfc_8285_requires() -> None:
    block = bytes.fromhex("10 9e f3 ffffffff 20 41")
    assert parse_header_extensions(ONE_BYTE_PROFILE, block) == [(1, b"\x9e")]


def test_one_byte_id_0_with_a_length_is_not_padding_and_ends_processing() -> None:
    block = bytes.fromhex("10 9e 01 aaaa 20 41")
    assert parse_header_extensions(ONE_BYTE_PROFILE, block) == [(1, b"\x9e")]


def test_two_byte_elements_allow_large_ids_and_empty_values() -> None:
    block = bytes.fromhex("0f 00 00 c8 03 616263 01 00 00")
    packet = parse_rtp(with_extension(0x100F, block[:8]))
    assert packet.header_extensions() == [(15, b""), (200, b"abc")]
    assert parse_header_extensions(0x1000, block) == [(15, b""), (200, b"abc"), (1, b"")]


@pytest.mark.parametrize(
    ("profile", "block", "message"),
    [
        (ONE_BYTE_PROFILE, bytes.fromhex("13 aabb"), "element 1 at offset 0 runs past"),
        (ONE_BYTE_PROFILE, bytes.fromhex("10 9e 00 22 4b"), "element 2 at offset 3 runs past"),
        (0x1000, bytes.fromhex("00 00 00 07"), "element 7 at offset 3 has no length byte"),
        (0x1000, bytes.fromhex("07 04 aabb"), "element 7 at offset 0 runs past"),
        (0xABCD, bytes(4), "profile 0xabcd is not RFC 8285"),
        (0x1010, bytes(4), "profile 0x1010 is not RFC 8285"),
    ],
)
def test_malformed_extension_blocks_raise_rtp_error(
    profile: int, block: bytes, message: str
) -> None:
    with pytest.raises(RtpError, match=message):
        parse_header_extensions(profile, block)


# --- building --------------------------------------------------------------------------


def test_build_rtp_lays_out_the_fixed_header_and_payload() -> None:
    assert (
        build_rtp(OPUS, 0xFFFF, 0xFFFFFFFF, 0x01020304, b"opus")
        == bytes.fromhex("80 6f ffff ffffffff 01020304") + b"opus"
    )
    assert build_rtp(0, 0, 0, 0, b"", marker=True) == bytes.fromhex("80 80 0000 00000000 00000000")


def test_build_rtp_matches_serialize_of_the_same_packet() -> None:
    packet = RtpPacket(OPUS, 7, 960, 0xCAFE, b"frame", marker=True)
    assert build_rtp(OPUS, 7, 960, 0xCAFE, b"frame", marker=True) == packet.serialize()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((128, 0, 0, 0), "payload type must be 0..127"),
        ((-1, 0, 0, 0), "payload type must be 0..127"),
        ((OPUS, 65536, 0, 0), "out of range"),
        ((OPUS, -1, 0, 0), "out of range"),
        ((OPUS, 0, 1 << 32, 0), "out of range"),
        ((OPUS, 0, 0, -1), "out of range"),
    ],
)
def test_build_rtp_rejects_fields_out_of_range(fields: tuple, message: str) -> None:
    with pytest.raises(RtpError, match=message):
        build_rtp(*fields, b"")


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (RtpPacket(200, 0, 0, 0), "payload type must be 0..127"),
        (RtpPacket(OPUS, 0, 0, 0, csrc=tuple(range(16))), "at most 15 CSRCs"),
        (RtpPacket(OPUS, 0, 0, 0, csrc=(1 << 32,)), "out of range"),
        (RtpPacket(OPUS, 0, 0, 0, padding_size=256), "padding size must be 0..255"),
        (RtpPacket(OPUS, 0, 0, 0, extension_profile=1, extension_data=b"abc"), "multiple of 4"),
        (RtpPacket(OPUS, 0, 0, 0, extension_profile=1 << 16), "out of range"),
    ],
)
def test_serialize_rejects_fields_that_do_not_fit(packet: RtpPacket, message: str) -> None:
    with pytest.raises(RtpError, match=message):
        packet.serialize()


def test_field_readers_read_without_parsing() -> None:
    assert rtp_ssrc(CHROMIUM_STYLE_OPUS) == 0x3CBBC3E1
    assert rtp_sequence(CHROMIUM_STYLE_OPUS) == 0x5A3C
    view = memoryview(CHROMIUM_STYLE_OPUS)[:12]
    assert rtp_ssrc(view) == 0x3CBBC3E1
    assert rtp_sequence(view) == 0x5A3C


@pytest.mark.parametrize("reader", [rtp_ssrc, rtp_sequence])
def test_field_readers_reject_short_input(reader) -> None:
    with pytest.raises(RtpError, match="truncated: 11 bytes"):
        reader(CHROMIUM_STYLE_OPUS[:11])


# --- interop: aiortc as an independent peer, and real SRTP -------------------------------


def test_aiortc_reads_the_extensions_we_parse_the_same_way() -> None:
    theirs = aiortc_rtp.RtpPacket.parse(CHROMIUM_STYLE_OPUS, aiortc_extension_map())
    ours = parse_rtp(CHROMIUM_STYLE_OPUS)
    assert theirs.extensions.audio_level == (True, 30)
    assert theirs.extensions.abs_send_time == 0x4B2A10
    assert theirs.extensions.transport_sequence_number == 7
    assert theirs.extensions.mid == "0"
    assert bytes(theirs.payload) == ours.payload
    assert (theirs.sequence_number, theirs.timestamp, theirs.ssrc, theirs.marker) == (
        ours.sequence_number,
        ours.timestamp,
        ours.ssrc,
        int(ours.marker),
    )


def test_we_read_extensions_aiortc_writes() -> None:
    packet = aiortc_rtp.RtpPacket(payload_type=OPUS, sequence_number=9, timestamp=4, ssrc=5)
    packet.extensions.audio_level = (False, 127)
    packet.extensions.transport_sequence_number = 0xBEEF
    packet.extensions.mid = "audio"
    packet.payload = b"\xfc\xff\xfe"
    ours = parse_rtp(packet.serialize(aiortc_extension_map()))
    assert ours.payload == b"\xfc\xff\xfe"
    assert dict(ours.header_extensions()) == {1: b"\x7f", 3: b"\xbe\xef", 4: b"audio"}


def test_two_byte_extensions_from_aiortc_parse() -> None:
    profile, block = aiortc_rtp.pack_header_extensions([(20, b""), (3, b"x" * 40)])
    assert profile == 0x1000
    packet = parse_rtp(with_extension(profile, block))
    assert packet.header_extensions() == [(20, b""), (3, b"x" * 40)]


@st.composite
def plain_packets(draw: st.DrawFn) -> RtpPacket:
    """Packets aiortc can express without an extension map: no header extension."""
    return RtpPacket(
        payload_type=draw(st.integers(0, 127)),
        sequence_number=draw(st.integers(0, 0xFFFF)),
        timestamp=draw(u32),
        ssrc=draw(u32),
        payload=draw(st.binary(max_size=64)),
        marker=draw(st.booleans()),
        csrc=tuple(draw(st.lists(u32, max_size=15))),
        padding_size=draw(st.integers(0, 255)),
    )


@settings(max_examples=200)
@given(plain_packets())
def test_aiortc_parses_what_we_serialize(packet: RtpPacket) -> None:
    theirs = aiortc_rtp.RtpPacket.parse(packet.serialize())
    assert (
        theirs.payload_type,
        theirs.sequence_number,
        theirs.timestamp,
        theirs.ssrc,
        bool(theirs.marker),
        tuple(theirs.csrc),
        theirs.padding_size,
        bytes(theirs.payload),
    ) == (
        packet.payload_type,
        packet.sequence_number,
        packet.timestamp,
        packet.ssrc,
        packet.marker,
        packet.csrc,
        packet.padding_size,
        packet.payload,
    )


@settings(max_examples=200)
@given(plain_packets())
def test_we_parse_what_aiortc_serializes(packet: RtpPacket) -> None:
    theirs = aiortc_rtp.RtpPacket(
        payload_type=packet.payload_type,
        marker=int(packet.marker),
        sequence_number=packet.sequence_number,
        timestamp=packet.timestamp,
        ssrc=packet.ssrc,
        payload=bytes(packet.payload),
    )
    theirs.csrc = list(packet.csrc)
    theirs.padding_size = packet.padding_size  # aiortc fills padding with random bytes
    assert parse_rtp(theirs.serialize()) == packet


def test_packets_survive_real_srtp_protect_and_unprotect() -> None:
    key = bytes(range(30))  # AES_CM_128_HMAC_SHA1_80: 16-byte key + 14-byte salt
    sender = pylibsrtp.Session(
        pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    )
    receiver = pylibsrtp.Session(
        pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    )
    for sequence in range(3):
        plain = build_rtp(OPUS, sequence, sequence * FRAME, 0x11223344, b"opus frame")
        protected = sender.protect(plain)
        assert protected != plain
        packet = parse_rtp(receiver.unprotect(protected))
        assert (packet.sequence_number, packet.payload) == (sequence, b"opus frame")
    chromium = sender.protect(CHROMIUM_STYLE_OPUS)
    assert rtp_ssrc(chromium) == 0x3CBBC3E1  # the header stays readable under SRTP
    assert parse_rtp(receiver.unprotect(chromium)).header_extensions()[2] == (3, b"\x00\x07")


# --- properties and fuzzing ------------------------------------------------------------


@st.composite
def rtp_packets(draw: st.DrawFn) -> RtpPacket:
    profile = draw(st.none() | st.sampled_from([ONE_BYTE_PROFILE, 0x1000, 0x1003, 0x0001]))
    extension = b""
    if profile is not None:
        extension = draw(st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4)))
    packet = draw(plain_packets())
    packet.extension_profile = profile
    packet.extension_data = extension
    return packet


@settings(max_examples=300)
@given(rtp_packets())
def test_parse_inverts_serialize(packet: RtpPacket) -> None:
    data = packet.serialize()
    assert parse_rtp(data) == packet
    assert parse_rtp(memoryview(data)) == packet


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_rtp_error(data: bytes) -> None:
    try:
        packet = parse_rtp(data)
    except RtpError:
        return
    with contextlib.suppress(RtpError):
        packet.header_extensions()


@st.composite
def mutated(draw: st.DrawFn, packets: st.SearchStrategy[RtpPacket]) -> bytes:
    """A valid packet with a few bytes changed, cut short, or with bytes appended."""
    data = bytearray(draw(packets).serialize())
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "flip", "truncate", "append"]))
        if action == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif action == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        elif data:
            index = draw(st.integers(0, len(data) - 1))
            if action == "set":
                data[index] = draw(st.integers(0, 255))
            else:
                data[index] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@settings(max_examples=500)
@given(mutated(rtp_packets()))
def test_mutated_valid_packets_raise_nothing_but_rtp_error(data: bytes) -> None:
    try:
        packet = parse_rtp(data)
    except RtpError:
        return
    # Whatever parses is represented faithfully: it serializes back to the same bytes,
    # except the padding, which serialize writes as zeros before the count.
    out = packet.serialize()
    kept = len(data) - packet.padding_size
    assert (len(out), out[:kept], out[-1:]) == (len(data), data[:kept], data[-1:])
    with contextlib.suppress(RtpError):
        packet.header_extensions()


# --- receive statistics (RFC 3550 A.1, A.3, A.8) ----------------------------------------


def feed(tracker: SequenceTracker, sequences: list[int]) -> list[bool]:
    """Feed packets that arrive exactly on time: packet n at 100 s + 20 ms * n, 960 * n ticks.

    Sequence numbers may be given unwrapped (65536 for 0); the tracker sees them wrapped.
    """
    return [
        tracker.update(sequence & 0xFFFF, (sequence * FRAME) & 0xFFFFFFFF, 100.0 + sequence * 0.02)
        for sequence in sequences
    ]


def test_a_new_source_is_counted_only_after_two_packets_in_sequence() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    assert feed(tracker, [500]) == [False]
    assert not tracker.valid
    assert tracker.expected == 0
    assert tracker.cumulative_lost == 0
    assert feed(tracker, [501, 502]) == [True, True]
    assert tracker.valid
    assert tracker.base_sequence == 501
    assert (tracker.packets_received, tracker.expected, tracker.cumulative_lost) == (2, 2, 0)


def test_probation_starts_over_on_a_packet_out_of_sequence() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    assert feed(tracker, [10, 12, 14, 15, 16]) == [False, False, False, True, True]
    assert tracker.base_sequence == 15


def test_probation_follows_the_sequence_across_its_wraparound() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    assert feed(tracker, [65535, 65536]) == [False, True]
    assert tracker.base_sequence == 0


def test_wraparound_extends_the_highest_sequence_by_one_cycle() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    assert all(feed(tracker, list(range(65530, 65542)))[1:])
    assert tracker.cycles == 65536
    assert tracker.extended_highest_sequence == 65536 + 5
    assert (tracker.expected, tracker.packets_received, tracker.cumulative_lost) == (11, 11, 0)
    assert tracker.report_block(1).highest_sequence == 65541


def test_many_wraparounds_keep_counting_cycles() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1])
    feed(tracker, [*range(1000, 3 * 65536, 1000), 3 * 65536 + 10])
    assert tracker.extended_highest_sequence == 3 * 65536 + 10


def test_loss_and_fraction_lost_per_report_interval() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2, 3, 5, 6, 9, 10])  # 0 is probation; base 1; 4, 7, 8 lost
    block = tracker.report_block(0xABCD, lsr=0x12345678, dlsr=0x10000)
    assert block == ReportBlock(
        ssrc=0xABCD,
        fraction_lost=(3 << 8) // 10,
        cumulative_lost=3,
        highest_sequence=10,
        jitter=0,
        last_sr=0x12345678,
        delay_since_last_sr=0x10000,
    )
    feed(tracker, [11, 12, 13, 14])
    second = tracker.report_block(0xABCD)
    assert (second.fraction_lost, second.cumulative_lost) == (0, 3)
    feed(tracker, [16, 20])  # 15, 17, 18, 19 lost of 6 expected
    third = tracker.report_block(0xABCD)
    assert (third.fraction_lost, third.cumulative_lost) == ((4 << 8) // 6, 7)


def test_late_packets_count_without_moving_the_highest_sequence() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2, 4, 5])
    assert tracker.cumulative_lost == 1
    assert tracker.update(3, 3 * FRAME, 101.0) is True
    assert tracker.extended_highest_sequence == 5
    assert tracker.cumulative_lost == 0
    assert tracker.report_block(1).fraction_lost == 0


def test_late_packet_from_before_a_wraparound_does_not_add_a_cycle() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [65533, 65534, 0, 1])
    assert tracker.update(65535, 0, 101.0) is True
    assert tracker.cycles == 65536
    assert tracker.extended_highest_sequence == 65537
    assert tracker.cumulative_lost == 0


def test_duplicates_make_cumulative_loss_negative_and_fraction_zero() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2, 2, 2, 3])
    assert tracker.cumulative_lost == -2
    block = tracker.report_block(1)
    assert (block.cumulative_lost, block.fraction_lost) == (-2, 0)


def test_a_jump_shorter_than_max_dropout_is_loss() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1])
    assert tracker.update(1 + MAX_DROPOUT - 1, 0, 101.0) is True
    assert tracker.cumulative_lost == MAX_DROPOUT - 2


def test_a_long_jump_is_ignored_until_the_next_packet_confirms_a_restart() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2])
    assert tracker.update(40000, 0, 101.0) is False
    assert tracker.extended_highest_sequence == 2
    assert tracker.update(40001, FRAME, 101.02) is True  # the sender restarted its sequence
    assert tracker.base_sequence == 40001
    assert (tracker.packets_received, tracker.expected, tracker.cumulative_lost) == (1, 1, 0)


def test_stray_packets_far_from_the_sequence_never_restart_it() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2])
    assert tracker.update(40000, 0, 101.0) is False
    assert tracker.update(50000, 0, 101.0) is False  # not 40001: no restart
    assert feed(tracker, [3, 4]) == [True, True]
    assert tracker.update(40001, 0, 101.0) is False  # 50000 re-armed the check for 50001
    assert tracker.base_sequence == 1
    assert (tracker.extended_highest_sequence, tracker.cumulative_lost) == (4, 0)


def test_a_step_back_beyond_max_misorder_is_treated_as_a_jump() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, list(range(1000, 1010)))
    assert tracker.update(1009 - MAX_MISORDER, 0, 101.0) is False
    assert tracker.update(1009 - MAX_MISORDER + 1, 0, 101.0) is True  # late, within reach
    assert tracker.update(1009 - MAX_MISORDER - 1, 0, 101.0) is False


def test_cumulative_loss_is_clamped_to_24_bit_signed() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1])
    sequence = 1
    while tracker.expected - tracker.packets_received <= (1 << 23):
        sequence = (sequence + MAX_DROPOUT - 1) & 0xFFFF
        assert tracker.update(sequence, 0, 101.0) is True
    assert tracker.cumulative_lost == (1 << 23) - 1
    assert tracker.report_block(1).cumulative_lost == (1 << 23) - 1


def test_report_block_before_the_source_is_valid_reports_nothing_lost() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    assert tracker.report_block(7) == ReportBlock(7, 0, 0, 0, 0, 0, 0)
    tracker.update(1234, 0, 100.0)
    block = tracker.report_block(7)
    assert (block.fraction_lost, block.cumulative_lost, block.jitter) == (0, 0, 0)


def test_jitter_is_zero_when_packets_arrive_exactly_paced() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    for i in range(100):  # a Unix time works as the clock as well as a monotonic one
        tracker.update(i, 12345 + i * FRAME, 1_700_000_000.0 + i * 0.02)
    # A float near 1.7e9 resolves 0.24 us, a hundredth of a tick: far below one tick.
    assert tracker.jitter == pytest.approx(0.0, abs=0.05)


def test_jitter_follows_the_rfc_estimator_for_alternating_delay() -> None:
    # Every other packet 5 ms (240 ticks) late: each transit difference is 240 ticks, so
    # J(n) = J(n-1) + (240 - J(n-1)) / 16 gives J(n) = 240 * (1 - (15/16) ** n).
    tracker = SequenceTracker(OPUS_RATE)
    for i in range(42):
        tracker.update(i, i * FRAME, 10.0 + i * 0.02 + (0.005 if i % 2 else 0.0))
    differences = 42 - 2  # packet 0 is probation, packet 1 only sets the first transit
    assert tracker.jitter == pytest.approx(240 * (1 - (15 / 16) ** differences), rel=1e-9)
    assert tracker.jitter_seconds == pytest.approx(tracker.jitter / OPUS_RATE)
    assert tracker.report_block(1).jitter == int(tracker.jitter)


@settings(max_examples=100)
@given(st.lists(st.floats(0.0, 0.2), min_size=3, max_size=40), u32)
def test_jitter_matches_the_rfc_transit_formula_even_across_timestamp_wrap(
    delays: list[float], first_timestamp: int
) -> None:
    tracker = SequenceTracker(OPUS_RATE)
    jitter = 0.0
    previous_transit = None
    for i, delay in enumerate(delays):
        arrival = 50.0 + i * 0.02 + delay
        timestamp = first_timestamp + i * FRAME  # unwrapped, for the reference
        tracker.update(i, timestamp & 0xFFFFFFFF, arrival)
        if i == 0:
            continue  # probation
        transit = arrival * OPUS_RATE - timestamp
        if previous_transit is not None:
            jitter += (abs(transit - previous_transit) - jitter) / 16
        previous_transit = transit
    assert tracker.jitter == pytest.approx(jitter, rel=1e-6, abs=1e-6)


def test_report_block_from_the_tracker_survives_an_rtcp_round_trip() -> None:
    tracker = SequenceTracker(OPUS_RATE)
    feed(tracker, [0, 1, 2, 2, 2, 3])
    block = tracker.report_block(0x55, lsr=1, dlsr=2)
    assert parse_rtcp(build_receiver_report(9, [block])) == [ReceiverReport(9, (block,))]


def test_tracker_rejects_a_clock_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="clock rate"):
        SequenceTracker(0)


# --- NTP and the sender clock ----------------------------------------------------------


def test_ntp_timestamp_of_known_instants() -> None:
    assert ntp_timestamp(0.0) == 2_208_988_800 << 32
    assert ntp_timestamp(1_700_000_000.25) == (3_908_988_800 << 32) | 0x40000000
    assert ntp_timestamp(1.5) == ((2_208_988_801) << 32) | 0x80000000


def test_ntp_seconds_wrap_in_2036() -> None:
    era_1_start = (1 << 32) - 2_208_988_800  # 2036-02-07 06:28:16 UTC
    assert ntp_timestamp(era_1_start) == 0
    assert ntp_timestamp(era_1_start - 0.5) == (0xFFFFFFFF << 32) | 0x80000000


def test_ntp_middle32_is_the_lsr_of_rfc_3550() -> None:
    assert ntp_middle32(0x0123456789ABCDEF) == 0x456789AB
    seconds_low16 = 3_908_988_800 & 0xFFFF
    assert ntp_middle32(ntp_timestamp(1_700_000_000.25)) == (seconds_low16 << 16) | 0x4000


def test_sender_clock_maps_time_to_rtp_ticks_and_wraps() -> None:
    clock = SenderClock(OPUS_RATE, start=1000.0, start_timestamp=0xFFFFF000)
    assert clock.rtp_timestamp(1000.0) == 0xFFFFF000
    assert clock.rtp_timestamp(1000.02) == 0xFFFFF000 + FRAME
    assert clock.rtp_timestamp(1001.0) == (0xFFFFF000 + 48_000) & 0xFFFFFFFF
    assert clock.rtp_timestamp(999.0) == 0xFFFFF000 - 48_000


def test_sender_clock_rejects_a_clock_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="clock rate"):
        SenderClock(-1, 0.0)
