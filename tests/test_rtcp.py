"""RTCP compound packets (RFC 3550 section 6, RFC 5506 reduced size, RFC 4585 feedback kept
whole), checked against hand-laid bytes, aiortc as an independent peer and real SRTCP;
round-trip time from report blocks; RtcpError as the only parse error."""

import contextlib
import struct

import pylibsrtp
import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.rtcp import (
    APP,
    BYE,
    CNAME,
    PSFB,
    PSFB_AFB,
    PSFB_PLI,
    RR,
    RTPFB,
    RTPFB_NACK,
    RTPFB_TRANSPORT_CC,
    SDES,
    SR,
    XR,
    Bye,
    Feedback,
    ReceiverReport,
    ReportBlock,
    RtcpError,
    RtcpPacket,
    SenderReport,
    SourceDescription,
    UnknownPacket,
    build_bye,
    build_receiver_report,
    build_sdes_cname,
    build_sender_report,
    is_rtcp,
    parse_rtcp,
    rtt_from_report_block,
    serialize_rtcp,
)
from voxrelay.proto.rtp import build_rtp, ntp_middle32, ntp_timestamp

OUR_SSRC = 0x3CBBC3E1
THEIR_SSRC = 0xDEADBEEF

# Laid out by hand from RFC 3550 section 6.4.1: an SR with one report block.
SENDER_REPORT = bytes.fromhex(
    "81 c8 000c"  # V=2 P=0 RC=1, PT=200, 12 words follow
    "3cbbc3e1"  # SSRC of sender
    "e8f1a2b3 40000000"  # NTP timestamp, seconds and fraction (.25)
    "9c4a1f80"  # RTP timestamp
    "000001f4"  # sender's packet count: 500
    "00013880"  # sender's octet count: 80000
    "deadbeef"  # report block: SSRC of the source reported on
    "19 fffffe"  # fraction lost 25/256, cumulative lost -2 (24-bit two's complement)
    "00015a3c"  # extended highest sequence number: one cycle + 0x5a3c
    "00000031"  # interarrival jitter: 49
    "a2b34000"  # LSR
    "00018000"  # DLSR: 1.5 s
)
SENDER_REPORT_BLOCK = ReportBlock(
    ssrc=THEIR_SSRC,
    fraction_lost=25,
    cumulative_lost=-2,
    highest_sequence=0x15A3C,
    jitter=49,
    last_sr=0xA2B34000,
    delay_since_last_sr=0x18000,
)
EMPTY_RECEIVER_REPORT = bytes.fromhex("80 c9 0001 3cbbc3e1")
SDES_CNAME = bytes.fromhex(
    "81 ca 0004"  # SC=1, PT=202, 4 words
    "3cbbc3e1"  # chunk SSRC
    "01 08" + b"voxrelay".hex() + "00"  # CNAME item, 8 bytes; the null item ending the list
    "00"  # null octet padding the chunk to 32 bits
)
BYE_WITH_REASON = bytes.fromhex("81 cb 0003 3cbbc3e1 04" + b"done".hex() + "000000")
PLI = bytes.fromhex("81 ce 0002 deadbeef 3cbbc3e1")  # PSFB FMT 1, no FCI
NACK = bytes.fromhex("81 cd 0003 deadbeef 3cbbc3e1 5a3c 0005")  # PID 0x5a3c, BLP: +1, +3
APP_PACKET = bytes.fromhex("80 cc 0003 deadbeef" + b"TEST".hex() + "01020304")

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


# --- parsing known bytes ---------------------------------------------------------------


def test_parses_a_sender_report_field_by_field() -> None:
    assert parse_rtcp(SENDER_REPORT) == [
        SenderReport(
            ssrc=OUR_SSRC,
            ntp_timestamp=0xE8F1A2B3_40000000,
            rtp_timestamp=0x9C4A1F80,
            packet_count=500,
            octet_count=80000,
            reports=(SENDER_REPORT_BLOCK,),
        )
    ]


def test_parses_a_compound_report_cname_and_bye_in_order() -> None:
    compound = EMPTY_RECEIVER_REPORT + SDES_CNAME + BYE_WITH_REASON
    assert parse_rtcp(compound) == [
        ReceiverReport(OUR_SSRC, ()),
        SourceDescription(((OUR_SSRC, ((CNAME, b"voxrelay"),)),)),
        Bye((OUR_SSRC,), "done"),
    ]


def test_serialize_reproduces_the_hand_laid_bytes() -> None:
    for data in (SENDER_REPORT, EMPTY_RECEIVER_REPORT, SDES_CNAME, BYE_WITH_REASON, NACK):
        assert serialize_rtcp(parse_rtcp(data)) == data
    compound = SENDER_REPORT + SDES_CNAME + PLI + APP_PACKET
    assert serialize_rtcp(parse_rtcp(compound)) == compound


def test_builders_lay_out_the_same_bytes() -> None:
    assert (
        build_sender_report(
            OUR_SSRC, 0xE8F1A2B3_40000000, 0x9C4A1F80, 500, 80000, [SENDER_REPORT_BLOCK]
        )
        == SENDER_REPORT
    )
    assert build_receiver_report(OUR_SSRC) == EMPTY_RECEIVER_REPORT
    assert build_sdes_cname(OUR_SSRC, "voxrelay") == SDES_CNAME
    assert build_sdes_cname(OUR_SSRC, b"voxrelay") == SDES_CNAME
    assert build_bye([OUR_SSRC], "done") == BYE_WITH_REASON


def test_bye_without_reason_and_with_several_sources() -> None:
    data = build_bye([1, 2, 3])
    assert data == bytes.fromhex("83 cb 0003 00000001 00000002 00000003")
    assert parse_rtcp(data) == [Bye((1, 2, 3), None)]
    assert parse_rtcp(build_bye([], "")) == [Bye((), "")]


def test_sdes_chunks_pad_each_to_32_bits_for_every_value_length() -> None:
    for length in range(10):
        value = b"c" * length
        data = build_sdes_cname(7, value)
        assert len(data) % 4 == 0
        # header, SSRC, type, length, value, at least one null, at most 4.
        assert 4 + 4 + 2 + length + 1 <= len(data) <= 4 + 4 + 2 + length + 4
        assert parse_rtcp(data) == [SourceDescription(((7, ((CNAME, value),)),))]


def test_sdes_with_several_chunks_and_items() -> None:
    description = SourceDescription(
        ((1, ((CNAME, b"a"), (2, b"Name"), (8, b"\x03privdata"))), (2, ()), (3, ((CNAME, b""),)))
    )
    data = serialize_rtcp([description])
    assert data[0] & 0x1F == 3
    assert parse_rtcp(data) == [description]


def test_report_blocks_carry_the_full_range_of_cumulative_loss() -> None:
    blocks = [
        ReportBlock(1, 255, (1 << 23) - 1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        ReportBlock(2, 0, -(1 << 23), 0, 0, 0, 0),
        ReportBlock(3, 0, -1, 0, 0, 0, 0),
    ]
    data = build_receiver_report(9, blocks)
    assert data[12:16] == bytes.fromhex("ff 7fffff")
    assert data[36:40] == bytes.fromhex("00 800000")
    assert data[60:64] == bytes.fromhex("00 ffffff")
    assert parse_rtcp(data) == [ReceiverReport(9, tuple(blocks))]


def test_sender_report_counts_wrap_at_32_bits() -> None:
    data = build_sender_report(1, 0, 0, (1 << 32) + 5, (1 << 32) + 7)
    report = parse_rtcp(data)[0]
    assert isinstance(report, SenderReport)
    assert (report.packet_count, report.octet_count) == (5, 7)


def test_reduced_size_packets_need_no_report_first_and_no_cname() -> None:
    assert parse_rtcp(PLI) == [Feedback(PSFB, PSFB_PLI, THEIR_SSRC, OUR_SSRC, b"")]
    assert parse_rtcp(NACK) == [
        Feedback(RTPFB, RTPFB_NACK, THEIR_SSRC, OUR_SSRC, bytes.fromhex("5a3c0005"))
    ]


def test_feedback_and_unknown_packets_are_kept_whole_not_rejected() -> None:
    transport_cc = bytes.fromhex("8f cd 0005 deadbeef 3cbbc3e1 0001 0002 000000 01 20010000")
    xr = bytes.fromhex("80 cf 0004 deadbeef 04000002 e8f1a2b3 40000000")
    packets = parse_rtcp(SENDER_REPORT + transport_cc + APP_PACKET + xr)
    assert packets[1:] == [
        Feedback(
            RTPFB,
            RTPFB_TRANSPORT_CC,
            THEIR_SSRC,
            OUR_SSRC,
            bytes.fromhex("0001 0002 00000001 20010000"),
        ),
        UnknownPacket(APP, 0, bytes.fromhex("deadbeef") + b"TEST" + bytes.fromhex("01020304")),
        UnknownPacket(XR, 0, bytes.fromhex("deadbeef 04000002 e8f1a2b3 40000000")),
    ]
    assert serialize_rtcp(packets) == SENDER_REPORT + transport_cc + APP_PACKET + xr


def test_padding_on_the_last_packet_is_removed() -> None:
    padded = bytes.fromhex("a0 c9 0002 3cbbc3e1 00000004")  # P=1, 4 bytes of padding
    assert parse_rtcp(SDES_CNAME + padded) == [
        SourceDescription(((OUR_SSRC, ((CNAME, b"voxrelay"),)),)),
        ReceiverReport(OUR_SSRC, ()),
    ]
    padded_app = bytes.fromhex("a1 cc 0003 deadbeef 41424344 00000004")
    assert parse_rtcp(padded_app) == [UnknownPacket(APP, 1, bytes.fromhex("deadbeef41424344"))]


def test_profile_specific_extensions_after_report_blocks_are_ignored() -> None:
    extended = bytearray(EMPTY_RECEIVER_REPORT + bytes.fromhex("cafebabe"))
    extended[3] = 2  # length now covers the extension word
    assert parse_rtcp(bytes(extended)) == [ReceiverReport(OUR_SSRC, ())]


def test_buffers_of_any_kind_parse_alike() -> None:
    compound = SENDER_REPORT + SDES_CNAME
    expected = parse_rtcp(compound)
    assert parse_rtcp(bytearray(compound)) == expected
    assert parse_rtcp(memoryview(b"\x00" + compound)[1:]) == expected


def test_is_rtcp_tells_rtcp_from_rtp_on_a_muxed_port() -> None:
    for data in (SENDER_REPORT, EMPTY_RECEIVER_REPORT, SDES_CNAME, BYE_WITH_REASON, PLI, NACK):
        assert is_rtcp(data)
    assert not is_rtcp(build_rtp(111, 1, 2, 3, b"x", marker=True))
    assert not is_rtcp(build_rtp(0, 1, 2, 3, b"x"))
    assert not is_rtcp(b"\x80")


# --- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x80\xc9\x00", "header truncated at offset 0: 3 bytes left"),
        (EMPTY_RECEIVER_REPORT + b"\x80\xc9", "header truncated at offset 8: 2 bytes left"),
        (bytes.fromhex("40 c9 0001 3cbbc3e1"), "version 1"),
        (EMPTY_RECEIVER_REPORT + bytes.fromhex("c0 c9 0001 3cbbc3e1"), "offset 8 has version 3"),
        (bytes.fromhex("80 c9 0002 3cbbc3e1"), "declares 12 bytes, but only 8 remain"),
        (SENDER_REPORT[:-4], "declares 52 bytes, but only 48 remain"),
        (
            bytes.fromhex("a0 c9 0002 3cbbc3e1 00000004") + EMPTY_RECEIVER_REPORT,
            "padding bit set but is not the last",
        ),
        (bytes.fromhex("a0 c9 0001 3cbbc3e1 "), "exceeds the packet's 4"),
        (bytes.fromhex("a0 c9 0001 3cbbc300"), "padding count is 0"),
        (bytes.fromhex("a0 cc 0000"), "padding count is 0"),
        (bytes.fromhex("a0 c9 0002 3cbbc3e1 00000008"), "needs 4 bytes, has 0"),
        (SENDER_REPORT[:-24].replace(b"\x81\xc8\x00\x0c", b"\x81\xc8\x00\x06"), "needs 48"),
        (bytes.fromhex("80 c8 0005") + bytes(20), "sender report with 0 report blocks needs 24"),
        (bytes.fromhex("81 c9 0001 3cbbc3e1"), "receiver report with 1 report blocks needs 28"),
        (bytes.fromhex("82 ca 0004") + SDES_CNAME[4:], "chunk 1 of 2 truncated"),
        (bytes.fromhex("81 ca 0002 00000007 0102aabb"), "SSRC 7) has no null item"),
        (bytes.fromhex("81 ca 0002 00000007 01050000"), "item type 1 at offset 8 runs past"),
        (bytes.fromhex("81 ca 0002 00000007 0201aa05"), "item type 5 at offset 11 has no length"),
        (bytes.fromhex("81 ca 0003 00000007 00000000 00000009"), "4 bytes after its 1 chunks"),
        (bytes.fromhex("81 ca 0001 00000007"), "SSRC 7) has no null item"),
        (bytes.fromhex("a1 ca 0002 00000007 0101aa01"), "SSRC 7) has no null item"),
        (bytes.fromhex("a1 ca 0002 00000007 00000002"), "not padded to a 32-bit boundary"),
        (bytes.fromhex("82 cb 0001 3cbbc3e1"), "BYE with 2 sources needs 8"),
        (bytes.fromhex("81 cb 0002 3cbbc3e1 07414243"), "reason of 7 bytes runs past"),
        (bytes.fromhex("81 cd 0001 deadbeef"), "feedback packet type 205 needs 8"),
        (bytes.fromhex("a1 ce 0002 deadbeef 00000004"), "feedback packet type 206 needs 8"),
    ],
)
def test_malformed_packets_raise_rtcp_error_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(RtcpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rtcp(data)


def test_rtcp_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_rtcp(b"\x80")
    assert issubclass(RtcpError, ValueError)


def test_an_invalid_utf8_bye_reason_is_replaced_not_rejected() -> None:
    data = bytes.fromhex("81 cb 0002 3cbbc3e1 02 ff41 00")
    assert parse_rtcp(data) == [Bye((OUR_SSRC,), "\ufffdA")]


# --- building: values that cannot be encoded -------------------------------------------


@pytest.mark.parametrize(
    ("packets", "message"),
    [
        ([], "at least one packet"),
        ([ReceiverReport(1, (ReportBlock(1, 0, 0, 0, 0, 0, 0),) * 32)], "must be 0..31, got 32"),
        ([ReceiverReport(1, (ReportBlock(1, 256, 0, 0, 0, 0, 0),))], "fraction lost must be"),
        ([ReceiverReport(1, (ReportBlock(1, 0, 1 << 23, 0, 0, 0, 0),))], "24-bit signed"),
        ([ReceiverReport(1, (ReportBlock(1, 0, -(1 << 23) - 1, 0, 0, 0, 0),))], "24-bit signed"),
        ([ReceiverReport(1, (ReportBlock(1 << 32, 0, 0, 0, 0, 0, 0),))], "out of range"),
        ([ReceiverReport(-1)], "out of range"),
        ([SenderReport(1, 1 << 64, 0, 0, 0)], "out of range"),
        ([Bye(tuple(range(32)))], "at most 31 sources"),
        ([SourceDescription(((1, ((0, b"x"),)),))], "item type must be 1..255"),
        ([SourceDescription(((1, ((CNAME, b"x" * 256),)),))], "max 255"),
        ([SourceDescription(((1, ()),) * 32)], "must be 0..31, got 32"),
        ([Feedback(PSFB, 32, 1, 2)], "must be 0..31, got 32"),
        ([Feedback(PSFB, PSFB_PLI, 1, 2, b"abc")], "not a whole number of 32-bit words"),
        ([UnknownPacket(APP, 0, b"abcde")], "not a whole number of 32-bit words"),
        ([UnknownPacket(256, 0, b"")], "out of range"),
        ([UnknownPacket(XR, 0, bytes(4 * 0x10000))], "too long"),
        (["not a packet"], "not an RTCP packet"),
    ],
)
def test_serialize_rejects_values_that_do_not_fit(packets: list, message: str) -> None:
    with pytest.raises(RtcpError, match=message):
        serialize_rtcp(packets)


def test_cname_that_cannot_be_sent_is_rejected() -> None:
    with pytest.raises(RtcpError, match="max 255"):
        build_sdes_cname(1, "c" * 256)
    with pytest.raises(RtcpError, match="cannot be encoded"):
        build_sdes_cname(1, "\ud800")


def test_a_long_bye_reason_is_cut_at_a_character_boundary() -> None:
    reason = "é" * 200  # 400 UTF-8 bytes
    (bye,) = parse_rtcp(build_bye([1], reason))
    assert isinstance(bye, Bye)
    assert bye.reason == "é" * 127  # 254 bytes: the 128th would need byte 256
    assert parse_rtcp(build_bye([1], "x" * 300)) == [Bye((1,), "x" * 255)]


# --- round-trip time (RFC 3550 6.4.1) --------------------------------------------------


def rtt_block(last_sr: int, delay: int) -> ReportBlock:
    return ReportBlock(OUR_SSRC, 0, 0, 0, 0, last_sr, delay)


def test_rtt_of_the_rfc_3550_figure_2_example() -> None:
    # A = 0xb710:8000 (46864.500 s), LSR = 0xb705:2000 (46853.125 s),
    # DLSR = 0x0005:4000 (5.250 s): A - LSR - DLSR = 0x0006:2000 (6.125 s).
    assert rtt_from_report_block(rtt_block(0xB7052000, 0x00054000), 0xB7108000) == 6.125


def test_rtt_is_none_when_the_peer_had_no_sender_report() -> None:
    assert rtt_from_report_block(rtt_block(0, 0), 0xB7108000) is None


def test_rtt_is_computed_modulo_2_to_the_32() -> None:
    assert rtt_from_report_block(rtt_block(0xFFFF8000, 0x4000), 0x00004000) == 0.5


def test_rtt_that_comes_out_negative_is_reported_as_zero() -> None:
    assert rtt_from_report_block(rtt_block(0x10000, 0x8000), 0x10000) == 0.0


def test_rtt_from_ntp_clock_readings() -> None:
    sent_at = 1_700_000_123.456
    lsr = ntp_middle32(ntp_timestamp(sent_at))
    held = int(0.25 * 65536)  # the peer answers 250 ms after our SR arrived
    arrival = ntp_middle32(ntp_timestamp(sent_at + 0.35))
    rtt = rtt_from_report_block(rtt_block(lsr, held), arrival)
    assert rtt == pytest.approx(0.1, abs=2 / 65536)


# --- interop: aiortc as an independent peer, and real SRTCP ------------------------------


def test_aiortc_parses_our_reports_cname_and_bye() -> None:
    compound = (
        SENDER_REPORT
        + build_receiver_report(7, [SENDER_REPORT_BLOCK])
        + SDES_CNAME
        + BYE_WITH_REASON
    )
    sr, rr, sdes, bye = aiortc_rtp.RtcpPacket.parse(compound)
    assert isinstance(sr, aiortc_rtp.RtcpSrPacket)
    assert (sr.ssrc, sr.sender_info.ntp_timestamp, sr.sender_info.octet_count) == (
        OUR_SSRC,
        0xE8F1A2B3_40000000,
        80000,
    )
    (their_block,) = sr.reports
    assert (their_block.packets_lost, their_block.highest_sequence, their_block.dlsr) == (
        -2,
        0x15A3C,
        0x18000,
    )
    assert isinstance(rr, aiortc_rtp.RtcpRrPacket)
    assert rr.reports == sr.reports
    assert sdes.chunks[0].items == [(CNAME, b"voxrelay")]
    assert bye.sources == [OUR_SSRC]


def test_we_parse_aiortc_feedback_messages() -> None:
    nack = aiortc_rtp.RtcpRtpfbPacket(
        fmt=RTPFB_NACK, ssrc=THEIR_SSRC, media_ssrc=OUR_SSRC, lost=[100, 101, 103, 200]
    )
    pli = aiortc_rtp.RtcpPsfbPacket(fmt=PSFB_PLI, ssrc=THEIR_SSRC, media_ssrc=OUR_SSRC)
    remb = aiortc_rtp.RtcpPsfbPacket(
        fmt=PSFB_AFB,
        ssrc=THEIR_SSRC,
        media_ssrc=0,
        fci=aiortc_rtp.pack_remb_fci(300_000, [OUR_SSRC]),
    )
    packets = parse_rtcp(bytes(nack) + bytes(pli) + bytes(remb))
    assert [(p.packet_type, p.fmt, p.sender_ssrc, p.media_ssrc) for p in packets] == [
        (RTPFB, RTPFB_NACK, THEIR_SSRC, OUR_SSRC),
        (PSFB, PSFB_PLI, THEIR_SSRC, OUR_SSRC),
        (PSFB, PSFB_AFB, THEIR_SSRC, 0),
    ]
    assert packets[0].fci == struct.pack("!HHHH", 100, 0b101, 200, 0)
    assert aiortc_rtp.unpack_remb_fci(packets[2].fci) == (300_000, [OUR_SSRC])
    assert serialize_rtcp(packets) == bytes(nack) + bytes(pli) + bytes(remb)


def test_sdes_from_aiortc_with_surplus_null_octets_parses() -> None:
    # aiortc ends each chunk with two null octets and then pads, so for some value lengths
    # the chunk carries a whole extra word of nulls; RFC 3550 calls it "one or more".
    for length in range(10):
        value = b"n" * length
        theirs = aiortc_rtp.RtcpSdesPacket(
            chunks=[aiortc_rtp.RtcpSourceInfo(ssrc=THEIR_SSRC, items=[(CNAME, value)])]
        )
        assert parse_rtcp(bytes(theirs)) == [SourceDescription(((THEIR_SSRC, ((CNAME, value),)),))]
        (ours,) = aiortc_rtp.RtcpPacket.parse(build_sdes_cname(OUR_SSRC, value))
        assert (ours.chunks[0].ssrc, ours.chunks[0].items) == (OUR_SSRC, [(CNAME, value)])


report_blocks = st.builds(
    ReportBlock,
    ssrc=u32,
    fraction_lost=st.integers(0, 255),
    cumulative_lost=st.integers(-(1 << 23), (1 << 23) - 1),
    highest_sequence=u32,
    jitter=u32,
    last_sr=u32,
    delay_since_last_sr=u32,
)
block_lists = st.lists(report_blocks, max_size=31).map(tuple)
sender_reports = st.builds(
    SenderReport,
    ssrc=u32,
    ntp_timestamp=st.integers(0, (1 << 64) - 1),
    rtp_timestamp=u32,
    packet_count=u32,
    octet_count=u32,
    reports=block_lists,
)
receiver_reports = st.builds(ReceiverReport, ssrc=u32, reports=block_lists)


def aiortc_block(block: ReportBlock) -> aiortc_rtp.RtcpReceiverInfo:
    return aiortc_rtp.RtcpReceiverInfo(
        ssrc=block.ssrc,
        fraction_lost=block.fraction_lost,
        packets_lost=block.cumulative_lost,
        highest_sequence=block.highest_sequence,
        jitter=block.jitter,
        lsr=block.last_sr,
        dlsr=block.delay_since_last_sr,
    )


def aiortc_report(report: SenderReport | ReceiverReport):
    blocks = [aiortc_block(block) for block in report.reports]
    if isinstance(report, ReceiverReport):
        return aiortc_rtp.RtcpRrPacket(ssrc=report.ssrc, reports=blocks)
    info = aiortc_rtp.RtcpSenderInfo(
        ntp_timestamp=report.ntp_timestamp,
        rtp_timestamp=report.rtp_timestamp,
        packet_count=report.packet_count,
        octet_count=report.octet_count,
    )
    return aiortc_rtp.RtcpSrPacket(ssrc=report.ssrc, sender_info=info, reports=blocks)


@settings(max_examples=150)
@given(st.lists(sender_reports | receiver_reports, min_size=1, max_size=3))
def test_reports_interoperate_with_aiortc_both_ways(reports: list) -> None:
    theirs = [aiortc_report(report) for report in reports]
    assert aiortc_rtp.RtcpPacket.parse(serialize_rtcp(reports)) == theirs
    assert parse_rtcp(b"".join(bytes(packet) for packet in theirs)) == reports


def test_compound_packets_survive_real_srtcp() -> None:
    key = bytes(range(30))
    sender = pylibsrtp.Session(
        pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    )
    receiver = pylibsrtp.Session(
        pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    )
    compound = SENDER_REPORT + SDES_CNAME + build_bye([OUR_SSRC], "hangup")
    protected = sender.protect_rtcp(compound)
    assert protected[:8] == compound[:8]  # SRTCP leaves the first header and SSRC clear
    assert is_rtcp(protected)
    assert parse_rtcp(receiver.unprotect_rtcp(protected)) == parse_rtcp(compound)


# --- properties and fuzzing ------------------------------------------------------------


def words(max_size: int = 48) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size).map(lambda b: b + bytes(-len(b) % 4))


sdes_items = st.tuples(st.integers(1, 255), st.binary(max_size=40))
rtcp_packets = st.one_of(
    sender_reports,
    receiver_reports,
    st.builds(
        SourceDescription,
        st.lists(st.tuples(u32, st.lists(sdes_items, max_size=3).map(tuple)), max_size=5).map(
            tuple
        ),
    ),
    st.builds(
        Bye,
        st.lists(u32, max_size=31).map(tuple),
        st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=60),
    ),
    st.builds(Feedback, st.sampled_from([RTPFB, PSFB]), st.integers(0, 31), u32, u32, words()),
    st.builds(
        UnknownPacket,
        st.integers(0, 255).filter(lambda t: t not in (SR, RR, SDES, BYE, RTPFB, PSFB)),
        st.integers(0, 31),
        words(),
    ),
)


@settings(max_examples=300)
@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_parse_inverts_serialize(packets: list[RtcpPacket]) -> None:
    data = serialize_rtcp(packets)
    assert parse_rtcp(data) == packets
    assert serialize_rtcp(parse_rtcp(data)) == data


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_rtcp_error(data: bytes) -> None:
    with contextlib.suppress(RtcpError):
        parse_rtcp(data)


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_arbitrary_bodies_behind_valid_headers_raise_only_rtcp_error(body: bytes) -> None:
    body += bytes(-len(body) % 4)
    for packet_type in (SR, RR, SDES, BYE, RTPFB, PSFB):
        for first in (0x80, 0x81, 0x9F, 0xA1):
            data = bytes((first, packet_type)) + struct.pack("!H", len(body) // 4) + body
            with contextlib.suppress(RtcpError):
                parse_rtcp(data)


@st.composite
def mutated_compounds(draw: st.DrawFn) -> bytes:
    """A valid compound packet with a few bytes changed, cut short, or bytes appended."""
    data = bytearray(serialize_rtcp(draw(st.lists(rtcp_packets, min_size=1, max_size=3))))
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
@given(mutated_compounds())
def test_mutated_valid_compounds_raise_nothing_but_rtcp_error(data: bytes) -> None:
    try:
        packets = parse_rtcp(data)
    except RtcpError:
        return
    # Whatever parses can be sent again.
    serialize_rtcp(packets)
