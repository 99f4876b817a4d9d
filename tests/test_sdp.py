"""SDP offers from real and realistic clients, and the ICE-lite answers built for them:
what is parsed, what is answered, what is refused (with which reason), and that hostile
input only ever raises SdpError."""

import asyncio
import contextlib
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.sdp import (
    ICE_PWD_LENGTH,
    MAX_LINES,
    MAX_SDP_BYTES,
    Answer,
    Candidate,
    Offer,
    SdpError,
    build_answer,
    generate_ice_pwd,
    parse_candidate,
    parse_offer,
)

DATA = Path(__file__).parent / "data"
CHROMIUM_OFFER = (DATA / "chromium-156" / "offer.sdp").read_bytes()
FIREFOX_OFFER = (DATA / "sdp" / "firefox-handwritten.sdp").read_bytes().decode()
SAFARI_OFFER = (DATA / "sdp" / "safari-handwritten.sdp").read_bytes().decode()
GSTREAMER_OFFER = (DATA / "sdp" / "gstreamer-handwritten.sdp").read_bytes().decode()
AIORTC_OFFER = (DATA / "sdp" / "aiortc-1.16.0.sdp").read_bytes().decode()
ALL_OFFERS = {
    "chromium": CHROMIUM_OFFER.decode(),
    "firefox": FIREFOX_OFFER,
    "safari": SAFARI_OFFER,
    "gstreamer": GSTREAMER_OFFER,
    "aiortc": AIORTC_OFFER,
}

TOKEN_UFRAG = "AQAHAAPK5mLw8Vx3bK9pQ2Rz"  # shaped like a routing token: 24 base64 chars
PASSWORD = "s3cretS3cretS3cretS3cret+/"
FINGERPRINT = ":".join(f"{byte:02X}" for byte in range(0xA0, 0xC0))
ANSWER_ARGUMENTS = {
    "ice_ufrag": TOKEN_UFRAG,
    "ice_pwd": PASSWORD,
    "fingerprint_sha256": FINGERPRINT,
    "candidate_address": "203.0.113.5",
    "candidate_port": 3478,
    "ssrc": 0x1234ABCD,
    "cname": "voxrelay-7",
    "session_id": 4611731400430051336,
}


def answer(offer: str | bytes | Offer, **overrides: object) -> Answer:
    parsed = offer if isinstance(offer, Offer) else parse_offer(offer)
    return build_answer(parsed, **{**ANSWER_ARGUMENTS, **overrides})  # type: ignore[arg-type]


def lines_of(sdp: str) -> list[str]:
    assert sdp.endswith("\r\n")
    return sdp[:-2].split("\r\n")


def media_blocks(sdp: str) -> list[list[str]]:
    """The answer's lines grouped per m-line (session lines dropped)."""
    blocks: list[list[str]] = []
    for line in lines_of(sdp):
        if line.startswith("m="):
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    return blocks


def edit(sdp: str, old: str, new: str) -> str:
    assert old in sdp, old
    return sdp.replace(old, new)


def refusal(offer: str | bytes) -> str:
    with pytest.raises(SdpError) as caught:
        answer(offer)
    return str(caught.value)


# ----------------------------------------------------------------- parsing: real bytes


def test_chromium_offer_parses_every_field():
    offer = parse_offer(CHROMIUM_OFFER)

    assert offer.origin is not None and offer.origin.session_id == "124860046680015147"
    assert offer.bundle_groups == (("0",),)
    assert not offer.ice_lite
    assert [a.name for a in offer.attributes] == ["group", "extmap-allow-mixed", "msid-semantic"]
    (audio,) = offer.media
    assert (audio.kind, audio.port, audio.protocol, audio.mid) == (
        "audio",
        41825,
        "UDP/TLS/RTP/SAVPF",
        "0",
    )
    assert audio.connection_address == "127.0.0.1"
    assert audio.direction == "sendrecv"
    assert (audio.ice_ufrag, audio.ice_pwd) == ("1Zid", "J/FA06aTogwRsuNH7OaJHdOM")
    assert audio.trickle and audio.ice_options == ("trickle",)
    assert audio.setup == "actpass"
    assert audio.rtcp_mux and audio.rtcp_rsize and not audio.bundle_only
    assert not audio.end_of_candidates
    assert audio.ssrcs == (2242451026,)
    (fingerprint,) = audio.fingerprints
    assert fingerprint.algorithm == "sha-256"
    assert fingerprint.digest.hex() == (
        "4e20e095db34b46be5ce69273b0fc3ea4e2f99cf5b22fb1bb3313528fdc853e1"
    )
    assert [(c.payload_type, c.name, c.clock_rate, c.channels) for c in audio.codecs] == [
        (111, "opus", 48000, 2),
        (63, "red", 48000, 2),
        (9, "G722", 8000, 1),
        (0, "PCMU", 8000, 1),
        (8, "PCMA", 8000, 1),
        (13, "CN", 8000, 1),
        (110, "telephone-event", 48000, 1),
        (126, "telephone-event", 8000, 1),
    ]
    opus = audio.codecs[0]
    assert opus.is_opus
    assert opus.fmtp == "minptime=10;useinbandfec=1"
    assert opus.parameters == {"minptime": "10", "useinbandfec": "1"}
    assert opus.rtcp_feedback == ("transport-cc",)
    assert audio.codecs[1].fmtp == "111/111"
    assert [(e.id, e.uri) for e in audio.header_extensions] == [
        (1, "urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
        (2, "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"),
        (3, "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"),
        (4, "urn:ietf:params:rtp-hdrext:sdes:mid"),
    ]
    media_lines = CHROMIUM_OFFER.decode().split("m=audio", 1)[1].split("\r\n")
    assert [
        f"a={a.name}" + (f":{a.value}" if a.value is not None else "") for a in audio.attributes
    ] == [
        line for line in media_lines if line.startswith("a=")
    ]  # every a= line of the m-line, kept in order


def test_chromium_candidates_parse_udp_tcp_ipv4_ipv6():
    (audio,) = parse_offer(CHROMIUM_OFFER).media
    candidates = audio.candidates
    assert len(candidates) == 8
    assert candidates[0] == Candidate(
        foundation="1367132318",
        component=1,
        transport="udp",
        priority=2122194687,
        address="127.0.0.1",
        port=41825,
        type="host",
        extensions=(("generation", "0"), ("network-id", "3"), ("network-cost", "50")),
    )
    assert [c.address for c in candidates[:4]] == ["127.0.0.1", "192.0.2.2", "::1", "fd00::2"]
    tcp = [c for c in candidates if c.transport == "tcp"]
    assert len(tcp) == 4
    assert all(c.tcptype == "active" and c.port == 9 for c in tcp)
    assert not any(c.is_mdns for c in candidates)


def test_offer_from_str_and_bytes_agree():
    assert parse_offer(CHROMIUM_OFFER) == parse_offer(CHROMIUM_OFFER.decode())


def test_lf_only_line_endings_are_accepted():
    assert parse_offer(CHROMIUM_OFFER.replace(b"\r\n", b"\n")) == parse_offer(CHROMIUM_OFFER)


# ------------------------------------------------------- parsing: other clients' shapes


def test_firefox_session_level_fingerprint_and_ice_options_apply_to_each_m_line():
    offer = parse_offer(FIREFOX_OFFER)
    audio, data = offer.media
    for section in (audio, data):
        assert section.fingerprints[0].value.startswith("7A:3C:91")
        assert section.trickle
    assert data.kind == "application" and data.protocol == "UDP/DTLS/SCTP"
    assert data.formats == ("webrtc-datachannel",) and data.codecs == ()


def test_firefox_candidates_mdns_uppercase_transport_srflx():
    (audio, _) = parse_offer(FIREFOX_OFFER).media
    host, tcp, srflx = audio.candidates
    assert host.is_mdns and host.transport == "udp" and host.type == "host"
    assert tcp.transport == "tcp" and tcp.tcptype == "active"
    assert (srflx.type, srflx.related_address, srflx.related_port) == ("srflx", "0.0.0.0", 0)
    assert audio.end_of_candidates


def test_firefox_extmap_direction_and_fmtp_before_rtpmap():
    (audio, _) = parse_offer(FIREFOX_OFFER).media
    assert audio.header_extensions[1].direction == "recvonly"
    opus = audio.codecs[0]
    assert (opus.payload_type, opus.is_opus) == (109, True)
    assert opus.parameters == {"maxplaybackrate": "48000", "stereo": "1", "useinbandfec": "1"}
    assert audio.codecs[2].channels == 1  # "G722/8000/1"


def test_gstreamer_uppercase_opus_and_session_level_trickle():
    (audio,) = parse_offer(GSTREAMER_OFFER).media
    assert audio.codecs[0].name == "OPUS" and audio.codecs[0].is_opus
    assert audio.codecs[0].rtcp_feedback == ("nack", "nack pli")
    assert audio.mid == "audio0" and audio.trickle and audio.candidates == ()


def test_aiortc_multiple_fingerprints():
    (audio,) = parse_offer(AIORTC_OFFER).media
    assert [f.algorithm for f in audio.fingerprints] == ["sha-256", "sha-384", "sha-512"]
    assert [len(f.digest) for f in audio.fingerprints] == [32, 48, 64]


def test_media_level_value_overrides_session_level():
    text = edit(
        FIREFOX_OFFER,
        "a=mid:1\r\n",
        "a=mid:1\r\na=fingerprint:sha-512 " + ":".join(["EE"] * 64) + "\r\n",
    )
    text = edit(text, "a=sendrecv\r\na=ice-pwd", "a=inactive\r\na=ice-pwd")
    audio, data = parse_offer(text).media
    assert audio.fingerprints[0].algorithm == "sha-256"
    assert data.fingerprints[0].algorithm == "sha-512"
    assert (audio.direction, data.direction) == ("sendrecv", "inactive")


def test_session_level_direction_applies_when_the_m_line_has_none():
    text = edit(GSTREAMER_OFFER, "a=sendrecv\r\n", "")
    text = edit(text, "t=0 0\r\n", "t=0 0\r\na=sendonly\r\n")
    (audio,) = parse_offer(text).media
    assert audio.direction == "sendonly"
    assert parse_offer(edit(GSTREAMER_OFFER, "a=sendrecv\r\n", "")).media[0].direction == (
        "sendrecv"
    )


def test_parse_candidate_trickle_forms_and_round_trip():
    value = "842163049 1 udp 1677729535 198.51.100.7 58384 typ srflx raddr 0.0.0.0 rport 0"
    for text in (value, "candidate:" + value, "a=candidate:" + value):
        candidate = parse_candidate(text)
        assert candidate.port == 58384 and candidate.related_port == 0
        assert parse_candidate(candidate.to_sdp()) == candidate
    assert candidate.to_sdp() == value


@pytest.mark.parametrize(
    "value, reason",
    [
        ("1 1 udp 5 1.2.3.4 9", "is not 'foundation"),
        ("1 1 udp 5 1.2.3.4 9 type host", "is not 'foundation"),
        ("1 0 udp 5 1.2.3.4 9 typ host", "component 0 is out of range"),
        ("1 1 udp 99999999999 1.2.3.4 9 typ host", "is not a number"),
        ("1 1 udp 5 1.2.3.4 65536 typ host", "port 65536 is out of range"),
        ("1 1 udp 5 300.2.3.4 9 typ host", "is not an IPv4 address"),
        ("1 1 udp 5 fe80::zz 9 typ host", "is not an IPv6 address"),
        ("1 1 udp 5 bad_host! 9 typ host", "is not an IP address or host name"),
        ("1 1 udp 5 1.2.3.4 9 typ host generation", "has no value"),
        ("f:o 1 udp 5 1.2.3.4 9 typ host", "foundation"),
    ],
)
def test_parse_candidate_rejects_malformed(value, reason):
    with pytest.raises(SdpError, match=re.escape(reason)):
        parse_candidate(value)


# ------------------------------------------------------------------------- answers


def test_chromium_answer_is_exactly_this():
    result = answer(CHROMIUM_OFFER)
    assert lines_of(result.sdp) == [
        "v=0",
        "o=- 4611731400430051336 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=ice-lite",
        "a=group:BUNDLE 0",
        "m=audio 3478 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 203.0.113.5",
        "a=mid:0",
        f"a=ice-ufrag:{TOKEN_UFRAG}",
        f"a=ice-pwd:{PASSWORD}",
        f"a=fingerprint:sha-256 {FINGERPRINT}",
        "a=setup:passive",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtcp-rsize",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=msid:voxrelay voxrelay-audio-305441741",
        "a=ssrc:305441741 cname:voxrelay-7",
        "a=ssrc:305441741 msid:voxrelay voxrelay-audio-305441741",
        "a=candidate:1 1 udp 2130706431 203.0.113.5 3478 typ host",
        "a=end-of-candidates",
    ]


def test_chromium_answer_reports_negotiated_parameters():
    result = answer(CHROMIUM_OFFER)
    assert (result.media_index, result.mid, result.bundle_mids) == (0, "0", ("0",))
    assert (result.opus_payload_type, result.opus_fmtp) == (111, "minptime=10;useinbandfec=1")
    assert (result.setup, result.dtls_role, result.direction) == ("passive", "server", "sendrecv")
    assert (result.ice_ufrag, result.ice_pwd) == (TOKEN_UFRAG, PASSWORD)
    assert (result.remote_ice_ufrag, result.remote_ice_pwd) == ("1Zid", "J/FA06aTogwRsuNH7OaJHdOM")
    assert [f.algorithm for f in result.remote_fingerprints] == ["sha-256"]
    assert len(result.remote_candidates) == 8
    assert result.remote_ssrcs == (2242451026,)
    assert result.rtcp_rsize


@pytest.mark.parametrize("client", sorted(ALL_OFFERS))
def test_answer_round_trips_through_our_parser(client):
    offer = parse_offer(ALL_OFFERS[client])
    result = answer(offer)
    parsed = parse_offer(result.sdp)

    assert parsed.ice_lite
    assert len(parsed.media) == len(offer.media)
    for index, (ours, theirs) in enumerate(zip(parsed.media, offer.media, strict=True)):
        assert (ours.kind, ours.mid) == (theirs.kind, theirs.mid)
        if index != result.media_index:
            assert ours.port == 0 and ours.protocol == theirs.protocol
            assert ours.formats == theirs.formats
    audio = parsed.media[result.media_index]
    assert audio.port == 3478 and audio.protocol == "UDP/TLS/RTP/SAVPF"
    assert (audio.ice_ufrag, audio.ice_pwd) == (TOKEN_UFRAG, PASSWORD)
    assert [(f.algorithm, f.value) for f in audio.fingerprints] == [("sha-256", FINGERPRINT)]
    assert audio.setup == result.setup
    assert [(c.name.lower(), c.payload_type) for c in audio.codecs] == [
        ("opus", result.opus_payload_type)
    ]
    assert audio.codecs[0].fmtp == result.opus_fmtp
    assert audio.rtcp_mux and audio.end_of_candidates
    (candidate,) = audio.candidates
    assert (candidate.address, candidate.port, candidate.type) == ("203.0.113.5", 3478, "host")
    assert audio.ssrcs == (0x1234ABCD,)
    assert parsed.bundle_groups == ((result.bundle_mids,) if result.bundle_mids else ())


def test_firefox_answer_rejects_data_channel_and_trims_opus_parameters():
    result = answer(FIREFOX_OFFER)
    audio, data = media_blocks(result.sdp)
    assert data == [
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
    ]
    assert "a=rtpmap:109 opus/48000/2" in audio
    assert "a=fmtp:109 useinbandfec=1" in audio  # maxplaybackrate and stereo are not kept
    assert "a=rtcp-rsize" not in audio  # not offered
    assert result.bundle_mids == ("0",)
    assert "a=group:BUNDLE 0" in lines_of(result.sdp)
    assert result.remote_fingerprints[0].value.startswith("7A:3C:91")  # from session level


def test_safari_answer_rejects_video_first_and_accepts_audio_second():
    result = answer(SAFARI_OFFER)
    video, audio = media_blocks(result.sdp)
    assert video == ["m=video 0 UDP/TLS/RTP/SAVPF 96 97 98 99", "c=IN IP4 0.0.0.0", "a=mid:0"]
    assert audio[0] == "m=audio 3478 UDP/TLS/RTP/SAVPF 111"
    assert "a=mid:1" in audio
    assert (result.media_index, result.mid, result.bundle_mids) == (1, "1", ("1",))
    assert "a=group:BUNDLE 1" in lines_of(result.sdp)
    assert all(c.is_mdns or c.type == "srflx" for c in result.remote_candidates)


def test_gstreamer_answer_without_opus_parameters_has_no_fmtp_line():
    result = answer(GSTREAMER_OFFER)
    assert result.opus_payload_type == 97 and result.opus_fmtp == ""
    assert not any(line.startswith("a=fmtp") for line in lines_of(result.sdp))
    assert "a=rtpmap:97 opus/48000/2" in lines_of(result.sdp)
    assert result.mid == "audio0" and result.bundle_mids == ("audio0",)
    assert result.remote_candidates == ()


def test_aiortc_answer_keeps_only_the_strongest_remote_fingerprint():
    result = answer(AIORTC_OFFER)
    assert [f.algorithm for f in result.remote_fingerprints] == ["sha-512"]


@pytest.mark.parametrize(
    "offered, our_setup, dtls_role",
    [
        ("actpass", "passive", "server"),
        ("active", "passive", "server"),
        ("passive", "active", "client"),
        (None, "passive", "server"),  # RFC 4145: no a=setup means active
    ],
)
def test_setup_role_is_the_complement_of_the_offer(offered, our_setup, dtls_role):
    text = CHROMIUM_OFFER.decode()
    replacement = f"a=setup:{offered}\r\n" if offered else ""
    result = answer(edit(text, "a=setup:actpass\r\n", replacement))
    assert (result.setup, result.dtls_role) == (our_setup, dtls_role)
    assert f"a=setup:{our_setup}" in lines_of(result.sdp)


@pytest.mark.parametrize(
    "offered, answered, sends",
    [
        ("sendrecv", "sendrecv", True),
        ("sendonly", "recvonly", False),
        ("recvonly", "sendonly", True),
        ("inactive", "inactive", False),
    ],
)
def test_direction_mirrors_the_offer(offered, answered, sends):
    result = answer(edit(CHROMIUM_OFFER.decode(), "a=sendrecv", f"a={offered}"))
    sdp_lines = lines_of(result.sdp)
    assert result.direction == answered and f"a={answered}" in sdp_lines
    assert any(line.startswith("a=msid:") for line in sdp_lines) is sends
    assert f"a=ssrc:{0x1234ABCD} cname:voxrelay-7" in sdp_lines  # RTCP needs a cname anyway


def test_ipv6_candidate_address():
    result = answer(CHROMIUM_OFFER, candidate_address="2001:db8::5")
    sdp_lines = lines_of(result.sdp)
    assert "c=IN IP6 2001:db8::5" in sdp_lines
    assert "a=candidate:1 1 udp 2130706431 2001:db8::5 3478 typ host" in sdp_lines


def test_second_audio_m_line_is_rejected():
    text = CHROMIUM_OFFER.decode()
    audio_section = text[text.index("m=audio") :]
    text = edit(text, "a=group:BUNDLE 0", "a=group:BUNDLE 0 1") + edit(
        audio_section, "a=mid:0", "a=mid:1"
    )
    result = answer(text)
    first, second = media_blocks(result.sdp)
    assert first[0].startswith("m=audio 3478 ")
    assert second[0].startswith("m=audio 0 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126")
    assert result.bundle_mids == ("0",)


def test_first_acceptable_audio_wins_when_the_first_has_no_opus():
    text = CHROMIUM_OFFER.decode()
    pcmu_only = edit(
        text[text.index("m=audio") :],
        "UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
        "UDP/TLS/RTP/SAVPF 0",
    )
    text = (
        edit(text[: text.index("m=audio")], "BUNDLE 0", "BUNDLE 1 0")
        + edit(pcmu_only, "a=mid:0", "a=mid:1")
        + text[text.index("m=audio") :]
    )
    result = answer(text)
    assert (result.media_index, result.mid) == (1, "0")


def test_bundle_only_audio_shares_the_transport_of_its_group():
    # JSEP max-bundle: the second m-line has port 0, a=bundle-only and no ICE or DTLS
    # attributes of its own.
    video_first = SAFARI_OFFER
    start = video_first.index("m=audio")
    audio_section = video_first[start:]
    for line in ("a=ice-ufrag:Vq3Z", "a=ice-pwd:Kp2mX9bR4tYw7nQ1sL6dF8hJ", "a=setup:actpass"):
        audio_section = edit(audio_section, line + "\r\n", "")
    audio_section = re.sub(r"a=(candidate|fingerprint|ice-options):[^\r]*\r\n", "", audio_section)
    audio_section = edit(audio_section, "m=audio 58384", "m=audio 0") + "a=bundle-only\r\n"
    result = answer(video_first[:start] + audio_section)
    assert (result.mid, result.remote_ice_ufrag) == ("1", "Vq3Z")
    assert result.remote_fingerprints[0].value.startswith("C2:5E")
    assert result.setup == "passive"


def test_generated_ice_pwd_is_strong_and_fresh():
    passwords = {generate_ice_pwd() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        assert len(password) == ICE_PWD_LENGTH >= 22
        assert re.fullmatch(r"[A-Za-z0-9+/]+", password)
    generated = answer(CHROMIUM_OFFER, ice_pwd=None)
    assert len(generated.ice_pwd) == ICE_PWD_LENGTH
    assert f"a=ice-pwd:{generated.ice_pwd}" in lines_of(generated.sdp)


def test_fingerprint_argument_is_normalized():
    result = answer(CHROMIUM_OFFER, fingerprint_sha256=FINGERPRINT.replace(":", "").lower())
    assert f"a=fingerprint:sha-256 {FINGERPRINT}" in lines_of(result.sdp)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("ice_ufrag", "abc"),  # shorter than 4
        ("ice_ufrag", "token:with:colons"),
        ("ice_pwd", "tooshort"),
        ("ice_pwd", "x" * 22 + "\r\na=ice-lite"),
        ("fingerprint_sha256", "AB:CD"),
        ("candidate_address", "relay.example.com"),
        ("candidate_port", 0),
        ("candidate_port", 65536),
        ("ssrc", 1 << 32),
        ("cname", "two words"),
        ("cname", ""),
        ("session_id", 1 << 63),
    ],
)
def test_bad_arguments_raise_value_error_not_sdp_error(argument, value):
    with pytest.raises(ValueError) as caught:
        answer(CHROMIUM_OFFER, **{argument: value})
    assert not isinstance(caught.value, SdpError)


def test_offer_values_cannot_inject_into_the_answer():
    text = edit(
        CHROMIUM_OFFER.decode(),
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=fmtp:111 minptime=10\ta=ice-lite;useinbandfec=1 x;stereo=1;maxaveragebitrate=9",
    )
    result = answer(text)
    assert result.opus_fmtp == ""
    assert "\t" not in result.sdp
    assert lines_of(result.sdp).count("a=ice-lite") == 1


# ------------------------------------------------------------------------ refusals


def test_refuses_offer_without_audio():
    reason = refusal(edit(SAFARI_OFFER, "m=audio", "m=text"))
    assert "no audio m-line" in reason and "video, text" in reason


def test_refuses_offer_whose_audio_is_disabled():
    assert "disabled" in refusal(edit(CHROMIUM_OFFER.decode(), "m=audio 41825", "m=audio 0"))


def test_refuses_audio_without_opus():
    text = edit(CHROMIUM_OFFER.decode(), "SAVPF 111 63 9 0 8 13 110 126", "SAVPF 9 0 8")
    reason = refusal(text)
    assert "no Opus" in reason and "G722/8000/1, PCMU/8000/1, PCMA/8000/1" in reason


def test_refuses_mono_opus():
    reason = refusal(edit(CHROMIUM_OFFER.decode(), "opus/48000/2", "opus/48000"))
    assert "no Opus (opus/48000/2)" in reason


def test_refuses_audio_without_fingerprint():
    text = re.sub(r"a=fingerprint:[^\r]*\r\n", "", CHROMIUM_OFFER.decode())
    assert "no a=fingerprint" in refusal(text)


def test_refuses_sha1_only_fingerprint():
    text = re.sub(
        r"a=fingerprint:[^\r]*", "a=fingerprint:sha-1 " + ":".join(["AB"] * 20), FIREFOX_OFFER
    )
    assert "uses sha-1; voxrelay needs sha-256" in refusal(text)


@pytest.mark.parametrize("line", ["a=ice-ufrag:1Zid", "a=ice-pwd:J/FA06aTogwRsuNH7OaJHdOM"])
def test_refuses_audio_without_ice_credentials(line):
    text = edit(CHROMIUM_OFFER.decode(), line + "\r\n", "")
    assert "no a=ice-ufrag and a=ice-pwd" in refusal(text)


def test_refuses_short_ice_pwd():
    text = edit(CHROMIUM_OFFER.decode(), "J/FA06aTogwRsuNH7OaJHdOM", "short")
    assert "a=ice-pwd 'short' is not 22-256 ICE characters" in refusal(text)


@pytest.mark.parametrize(
    "profile", ["RTP/SAVPF", "RTP/AVP", "UDP/TLS/RTP/SAVP", "TCP/DTLS/RTP/SAVPF"]
)
def test_refuses_other_rtp_profiles(profile):
    text = edit(CHROMIUM_OFFER.decode(), "UDP/TLS/RTP/SAVPF", profile)
    assert f"uses profile {profile}; voxrelay supports only UDP/TLS/RTP/SAVPF" in refusal(text)


def test_refuses_audio_without_rtcp_mux_as_not_bundleable():
    text = edit(CHROMIUM_OFFER.decode(), "a=rtcp-mux\r\n", "")
    assert "lacks a=rtcp-mux, so it cannot be bundled" in refusal(text)


def test_refuses_bundle_only_audio_outside_any_group():
    text = edit(CHROMIUM_OFFER.decode(), "a=group:BUNDLE 0\r\n", "")
    text = edit(text, "a=ice-ufrag:1Zid\r\n", "") + "a=bundle-only\r\n"
    assert "bundle-only but in no BUNDLE group" in refusal(text)


def test_refuses_ice_lite_offerer():
    text = edit(CHROMIUM_OFFER.decode(), "t=0 0\r\n", "t=0 0\r\na=ice-lite\r\n")
    assert "neither side would run connectivity checks" in refusal(text)


def test_refuses_holdconn():
    text = edit(CHROMIUM_OFFER.decode(), "a=setup:actpass", "a=setup:holdconn")
    assert "holdconn" in refusal(text)


def test_reason_names_the_first_audio_m_line_when_none_is_acceptable():
    text = edit(CHROMIUM_OFFER.decode(), "a=rtcp-mux\r\n", "")
    text = edit(text, "SAVPF 111 63 9 0 8 13 110 126", "SAVPF 0")
    assert "no Opus" in refusal(text)


def test_sdp_error_is_a_protocol_error_and_a_value_error():
    assert issubclass(SdpError, ProtocolError) and issubclass(SdpError, ValueError)


# -------------------------------------------------------------------- hostile input


def malformed(text: str | bytes) -> str:
    with pytest.raises(SdpError) as caught:
        parse_offer(text)
    return str(caught.value)


@pytest.mark.parametrize(
    "old, new, reason",
    [
        ("v=0", "v=1", "line 1: unsupported SDP version"),
        ("v=0\r\n", "", "line 1: a session description must start with v=0"),
        ("s=-", "x=-", "line 3: unknown line type 'x'"),
        ("s=-", "s -", "line 3: 's -' is not '<type>=<value>'"),
        ("t=0 0\r\n", "t=0 0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", "line 5: more than one o= line"),
        ("o=- 124860046680015147 2 IN IP4 127.0.0.1", "o=- 1 2", "line 2: o= must be"),
        ("m=audio 41825 ", "m=audio 70000 ", "line 8: m= port 70000 is out of range 0..65535"),
        ("m=audio 41825 ", "m=audio 99999999999 ", "line 8: m= port '99999999999' is not a number"),
        ("m=audio 41825 ", "m=audio -1 ", "is not a number"),
        ("SAVPF 111 63", "SAVPF 111 abc", "line 8: m= payload type 'abc' is not a number"),
        ("SAVPF 111 63", "SAVPF 111 128", "m= payload type 128 is out of range 0..127"),
        ("m=audio 41825 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "m=audio 41825", "m= must be"),
        ("c=IN IP4 127.0.0.1", "c=IN IPX 127.0.0.1", "line 9: c= must be"),
        (
            "a=rtpmap:111 opus/48000/2",
            "a=rtpmap:111 opus",
            "line 34: a=rtpmap '111 opus' is not",
        ),
        ("a=rtpmap:111 opus/48000/2", "a=rtpmap:9 opus/48000/2", "payload type 9 appears twice"),
        ("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus/0/2", "clock rate 0 is out of range"),
        ("a=fmtp:63 111/111", "a=fmtp:111 x=1", "a=fmtp for payload type 111 appears twice"),
        ("a=setup:actpass", "a=setup:sometimes", "a=setup:sometimes is not active"),
        ("a=mid:0", "a=mid:0\r\na=mid:1", "a=mid appears twice"),
        ("a=mid:0", 'a=mid:"0"', "a=mid '\"0\"' is not a token"),
        ("a=mid:0", "a=mid", "a=mid needs a value"),
        ("a=ice-ufrag:1Zid", "a=ice-ufrag:1Zid\r\na=ice-ufrag:2Zid", "a=ice-ufrag appears twice"),
        ("a=fingerprint:sha-256 4E:20", "a=fingerprint:sha-256 4E:2", "is not 'hash-function"),
        (
            "a=fingerprint:sha-256 4E:20:",
            "a=fingerprint:sha-256 ",
            "sha-256 has 30 bytes; sha-256 has 32",
        ),
        ("a=group:BUNDLE 0", "a=group:BUNDLE 0 7", "names mid '7', which no m-line has"),
        ("a=group:BUNDLE 0", "a=group:BUNDLE 0\r\na=group:BUNDLE 0", "more than one BUNDLE"),
        ("a=extmap:1 ", "a=extmap:0 ", "a=extmap id 0 is out of range"),
        ("a=extmap:1 ", "a=extmap:1/sideways ", "a=extmap direction 'sideways'"),
        ("a=ssrc:2242451026 cname", "a=ssrc:99999999999 cname", "is not a number"),
        ("a=sendrecv", "a=sendrecv\r\na=recvonly", "more than one direction"),
        ("a=rtcp-fb:111 transport-cc", "a=rtcp-fb:111", "names no feedback type"),
        ("a=rtcp-mux", "a=rtcp mux", "attribute name 'rtcp mux' is not a token"),
        (
            "a=candidate:1367132318 1 udp 2122194687 127.0.0.1 41825 typ host",
            "a=candidate:x",
            "line 11: candidate",
        ),
        (
            "a=rtcp-mux",
            "a=rtcp-mux\r\nt=0 0",
            "t= is a session-level line but comes after an m= line",
        ),
    ],
)
def test_malformed_lines_raise_sdp_error_with_line_number(old, new, reason):
    assert reason in malformed(edit(CHROMIUM_OFFER.decode(), old, new))


def test_duplicate_mid_across_m_lines():
    text = edit(FIREFOX_OFFER, "a=mid:1", "a=mid:0")
    text = edit(text, "a=group:BUNDLE 0 1", "a=group:BUNDLE 0")
    assert "a=mid:0 names more than one m-line" in malformed(text)


def test_invalid_utf8_is_refused():
    assert "not UTF-8 (byte 3" in malformed(b"v=0\xff\r\n")


def test_lone_surrogate_in_str_is_refused():
    assert "not valid Unicode" in malformed("v=0\r\ns=\udc80\r\n")


@pytest.mark.parametrize("character", ["\x00", "\x1b", "\x7f", "\r"])
def test_control_characters_are_refused(character):
    text = edit(CHROMIUM_OFFER.decode(), "s=-", f"s=a{character}b")
    assert "line 3 contains control character" in malformed(text)


def test_non_ascii_session_name_is_fine():
    assert parse_offer(edit(CHROMIUM_OFFER.decode(), "s=-", "s=Grüße 📞")).session_name == (
        "Grüße 📞"
    )


def test_empty_and_whitespace_bodies():
    assert "empty" in malformed(b"")
    assert "must start with v=0" in malformed("\r\n\r\n")
    assert "line 1: ' v=0' is not '<type>=<value>'" in malformed(" v=0\r\n")


def test_size_limits_are_enforced_before_parsing():
    assert f"longer than {MAX_SDP_BYTES} bytes" in malformed(b"v=0\r\n" + b"a" * MAX_SDP_BYTES)
    # 30,000 three-byte characters: fewer characters than the limit, more bytes.
    assert "longer than" in malformed("v=0\r\ns=" + "€" * 30_000)
    assert f"more than {MAX_LINES} lines" in malformed("v=0\r\n" + "a=x\r\n" * MAX_LINES)
    assert parse_offer("v=0\r\n" + "a=x\r\n" * (MAX_LINES - 1)).attributes[-1].name == "x"
    assert "line 2 is longer than 4096" in malformed("v=0\r\ns=" + "x" * 5000 + "\r\n")


def test_worst_case_input_is_parsed_quickly():
    candidate = "a=candidate:1 1 udp 2122194687 " + "a" * 60 + ".local 9 typ host generation 0\r\n"
    body = CHROMIUM_OFFER.decode() + candidate * (
        (MAX_SDP_BYTES - len(CHROMIUM_OFFER)) // len(candidate)
    )
    assert len(body.encode()) <= MAX_SDP_BYTES
    started = time.perf_counter()
    offer = parse_offer(body)
    build_answer(offer, **ANSWER_ARGUMENTS)  # type: ignore[arg-type]
    assert time.perf_counter() - started < 1.0
    assert len(offer.media[0].candidates) > 500


sdp_lines = st.lists(
    st.one_of(
        st.sampled_from(CHROMIUM_OFFER.decode().split("\r\n")),
        st.sampled_from(FIREFOX_OFFER.split("\r\n")),
        st.sampled_from(SAFARI_OFFER.split("\r\n")),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
        st.builds(
            lambda letter, rest: f"{letter}={rest}",
            st.sampled_from("vosicbtmaz"),
            st.text(max_size=40),
        ),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes_only_raise_sdp_error(data):
    with contextlib.suppress(SdpError):
        parse_offer(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_offers_parse_or_raise_sdp_error_and_answers_round_trip(data):
    base = data.draw(st.sampled_from(sorted(ALL_OFFERS)))
    lines = ALL_OFFERS[base].split("\r\n")
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(lines)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if action == "insert":
            lines[position:position] = data.draw(sdp_lines)[:3]
        elif lines and position < len(lines):
            if action == "delete":
                del lines[position]
            elif action == "replace":
                lines[position] = data.draw(sdp_lines.map(lambda ls: ls[0] if ls else ""))
            else:
                lines[position] = lines[position][: data.draw(st.integers(0, 80))]
    text = "\r\n".join(lines)
    try:
        offer = parse_offer(text)
    except SdpError:
        return
    try:
        result = build_answer(offer, **ANSWER_ARGUMENTS)  # type: ignore[arg-type]
    except SdpError:
        return
    reparsed = parse_offer(result.sdp)
    assert len(reparsed.media) == len(offer.media)
    assert reparsed.media[result.media_index].codecs[0].payload_type == result.opus_payload_type


def test_dataclasses_are_frozen():
    offer = parse_offer(CHROMIUM_OFFER)
    with pytest.raises(AttributeError):
        offer.media = ()  # type: ignore[misc]
    assert replace(offer, session_name="x").session_name == "x"


# ----------------------------------------------------------------- aiortc interop


async def aiortc_accepts_our_answer() -> None:
    import aiortc
    from aiortc import sdp as aiortc_sdp

    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = parse_offer(pc.localDescription.sdp)
        result = build_answer(offer, **{**ANSWER_ARGUMENTS, "candidate_address": "127.0.0.1"})
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(result.sdp, "answer"))

        assert pc.signalingState == "stable"
        (transceiver,) = pc.getTransceivers()
        assert transceiver.currentDirection == "sendrecv"
        ice_transport = transceiver.receiver.transport.transport
        assert [(c.ip, c.port, c.type) for c in ice_transport.getRemoteCandidates()] == [
            ("127.0.0.1", 3478, "host")
        ]
        (media,) = aiortc_sdp.SessionDescription.parse(result.sdp).media
        assert media.ice.iceLite
        assert (media.ice.usernameFragment, media.ice.password) == (TOKEN_UFRAG, PASSWORD)
        assert media.dtls.role == "server"  # passive: aiortc will send the ClientHello
        assert [(c.mimeType, c.payloadType) for c in media.rtp.codecs] == [("audio/opus", 96)]
    finally:
        await pc.close()


def test_aiortc_accepts_our_answer():
    # aiortc is a test-only dependency; without it this interop check cannot run.
    pytest.importorskip("aiortc")
    asyncio.run(asyncio.wait_for(aiortc_accepts_our_answer(), timeout=20))
