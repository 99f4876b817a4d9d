"""The backend wire protocol codec (docs/backend-protocol.md): exact event JSON and frame
bytes, strict rejection of everything else, and decoders that raise BackendProtocolError
alone whatever they are fed."""

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.backend_wire import (
    AUDIO_HEADER_SIZE,
    MAX_EVENT_BYTES,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    AudioClear,
    AudioFrame,
    BackendProtocolError,
    CloseCode,
    ErrorCode,
    ErrorEvent,
    Mark,
    MarkCleared,
    MarkPlayed,
    SessionEnd,
    SessionEnded,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    decode_audio_frame,
    encode_audio_frame,
    encode_event,
    opus_packet_samples,
    parse_backend_event,
    parse_transceiver_event,
    pcm16_frame_bytes,
)
from voxrelay.proto.errors import ProtocolError

# A 20 ms Opus packet as libopus codes it (TOC 0x78: hybrid fullband 20 ms, one frame).
OPUS_20MS = bytes([0x78]) + bytes(range(40))


def started(**changes: object) -> dict:
    document = {
        "type": "session.started",
        "protocol_version": 1,
        "call_id": "c1",
        "codec": "pcm16",
        "sample_rate": 16000,
        "channels": 1,
        "frame_duration_ms": 20,
        "max_queued_ms": 30000,
        "metadata": {"caller": "+15550100", "vip": True},
    }
    document.update(changes)
    return {key: value for key, value in document.items() if value is not None}


def raw_frame(first: int = 0x12, flags: int = 0, reserved: int = 0, ts: int = 0) -> bytes:
    """Lay out a frame header field by field, independently of the module under test."""
    return struct.pack("!BBHI", first, flags, reserved, ts)


# ------------------------------------------------------------------------ constants


def test_constants_match_the_spec() -> None:
    assert PROTOCOL_VERSION == 1
    assert SUBPROTOCOL == "voxrelay.backend.v1"
    assert AUDIO_HEADER_SIZE == 8
    assert MAX_EVENT_BYTES == 65536
    assert [pcm16_frame_bytes(rate) for rate in (8000, 16000, 24000, 48000)] == [
        320,
        640,
        960,
        1920,
    ]


# ------------------------------------------------------------------------ events


def test_session_started_encodes_every_field() -> None:
    event = SessionStarted(
        call_id="c1",
        codec="pcm16",
        sample_rate=16000,
        max_queued_ms=30000,
        metadata={"caller": "+15550100", "vip": True},
    )
    assert json.loads(encode_event(event)) == started()


def test_events_encode_to_their_spec_json() -> None:
    assert json.loads(encode_event(AudioClear())) == {"type": "audio.clear"}
    assert json.loads(encode_event(Mark("m1"))) == {"type": "mark", "name": "m1"}
    assert json.loads(encode_event(SessionEnd("bye"))) == {"type": "session.end", "reason": "bye"}
    assert json.loads(encode_event(MarkCleared("m2"))) == {"type": "mark.cleared", "name": "m2"}
    assert json.loads(encode_event(SpeechStopped(960))) == {
        "type": "speech.stopped",
        "timestamp": 960,
    }
    assert json.loads(encode_event(ErrorEvent("audio_queue_full", "x"))) == {
        "type": "error",
        "code": "audio_queue_full",
        "message": "x",
    }


@pytest.mark.parametrize(
    "event",
    [
        SessionStarted("c", "opus", 48000, 1000, {}),
        SessionStarted("c" * 128, "pcm16", 8000, 600000, {"k": None, "n": 1.5, "i": -3}),
        SessionEnded("ended by client (DELETE)"),
        SessionEnded(""),
        SpeechStarted(0),
        SpeechStopped(0xFFFFFFFF),
        MarkPlayed("ä" * 256),
        MarkCleared("m"),
        ErrorEvent("invalid_event", ""),
    ],
)
def test_transceiver_events_round_trip(event: object) -> None:
    assert parse_transceiver_event(encode_event(event)) == event  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event", [AudioClear(), Mark("greeting-end"), SessionEnd("goodbye"), ErrorEvent("x.y_1", "m")]
)
def test_backend_events_round_trip(event: object) -> None:
    text = encode_event(event)  # type: ignore[arg-type]
    assert parse_backend_event(text) == event
    assert parse_backend_event(text.encode()) == event


def test_each_side_may_send_only_its_own_events() -> None:
    with pytest.raises(BackendProtocolError, match="not one a backend may send"):
        parse_backend_event('{"type": "session.started"}')
    with pytest.raises(BackendProtocolError, match="not one the transceiver may send"):
        parse_transceiver_event('{"type": "audio.clear"}')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"mark"', "must be a JSON object"),
        ("{}", "needs a string field 'type'"),
        ('{"type": 3}', "needs a string field 'type'"),
        ('{"type": "audio.flush"}', "unknown event type 'audio.flush'"),
        ('{"type": "mark"}', "mark is missing field 'name'"),
        ('{"type": "mark", "name": ""}', "'name' must be 1 to 256 characters"),
        ('{"type": "mark", "name": 7}', "'name' must be a string"),
        ('{"type": "mark", "name": "a", "at": 1}', "mark has no field 'at'"),
        ('{"type": "audio.clear", "all": true}', "audio.clear has no field 'all'"),
        ('{"type": "session.end", "reason": null}', "'reason' must be a string"),
        ('{"type": "error", "code": "Bad Code", "message": ""}', "'code' must be 1 to 64"),
        ('{"type": "mark", "name": "a", "name": 1}', "'name' must be a string"),
    ],
)
def test_malformed_backend_events_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(BackendProtocolError, match=message) as caught:
        parse_backend_event(text)
    assert caught.value.error_code == ErrorCode.INVALID_EVENT
    assert caught.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"protocol_version": 2}, "'protocol_version' must be 1"),
        ({"protocol_version": True}, "'protocol_version' must be an integer"),
        ({"sample_rate": 44100}, "'sample_rate' must be 8000"),
        ({"sample_rate": 16000.0}, "'sample_rate' must be an integer"),
        ({"codec": "opus"}, "codec 'opus' has sample_rate 48000"),
        ({"codec": "g711"}, "'codec' must be 'opus' or 'pcm16'"),
        ({"channels": 2}, "'channels' must be 1"),
        ({"frame_duration_ms": 10}, "'frame_duration_ms' must be 20"),
        ({"max_queued_ms": 0}, "'max_queued_ms' must be in 1..600000"),
        ({"metadata": []}, "'metadata' must be an object"),
        ({"metadata": {"a": {"nested": 1}}}, "must be a string, number, boolean or null"),
        ({"metadata": {"a": [1]}}, "must be a string, number, boolean or null"),
        ({"metadata": {"a": 2**60}}, "outside the exact range"),
        ({"metadata": {"": 1}}, "keys must be strings of 1 to 64"),
        ({"metadata": {str(i): i for i in range(65)}}, "has 65 entries, at most 64 allowed"),
        ({"call_id": ""}, "'call_id' must be 1 to 128"),
        ({"metadata": None}, "missing field 'metadata'"),
    ],
)
def test_session_started_is_checked_field_by_field(changes: dict, message: str) -> None:
    with pytest.raises(BackendProtocolError, match=message):
        parse_transceiver_event(json.dumps(started(**changes)))


def test_uint32_timestamps_are_bounded() -> None:
    with pytest.raises(BackendProtocolError, match=r"in 0\.\.4294967295"):
        parse_transceiver_event('{"type": "speech.started", "timestamp": 4294967296}')
    with pytest.raises(BackendProtocolError, match=r"in 0\.\.4294967295"):
        parse_transceiver_event('{"type": "speech.started", "timestamp": -1}')


def test_oversize_events_are_rejected_before_parsing() -> None:
    text = '{"type": "mark", "name": "' + "a" * MAX_EVENT_BYTES + '"}'
    for data in (text, text.encode()):
        with pytest.raises(BackendProtocolError, match="over the 65536-byte limit") as caught:
            parse_backend_event(data)
        assert caught.value.error_code == ErrorCode.MESSAGE_TOO_LARGE
        assert caught.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_invalid_utf8_and_lone_surrogates_are_protocol_errors() -> None:
    with pytest.raises(BackendProtocolError, match="not valid JSON"):
        parse_backend_event(b'{"type": "mark", "name": "\xff"}')
    with pytest.raises(BackendProtocolError, match="not valid Unicode"):
        parse_backend_event('{"type": "mark", "name": "\ud800"}')


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(BackendProtocolError, match="not valid JSON"):
        parse_backend_event("[" * 30000 + "]" * 30000)


def test_huge_integers_are_protocol_errors() -> None:
    with pytest.raises(BackendProtocolError):
        parse_transceiver_event('{"type": "speech.started", "timestamp": 1' + "0" * 40 + "}")


def test_encoder_refuses_what_the_decoder_would_reject() -> None:
    with pytest.raises(BackendProtocolError, match="'name' must be 1 to 256"):
        encode_event(Mark("x" * 257))
    with pytest.raises(BackendProtocolError, match="codec 'opus' has sample_rate 48000"):
        encode_event(SessionStarted("c", "opus", 16000, 1000, {}))
    with pytest.raises(BackendProtocolError, match="must be a string, number"):
        encode_event(SessionStarted("c", "pcm16", 16000, 1000, {"k": object()}))  # type: ignore[dict-item]
    with pytest.raises(BackendProtocolError, match="not a backend protocol event"):
        encode_event("mark")  # type: ignore[arg-type]


def test_protocol_error_is_a_protocol_error() -> None:
    assert issubclass(BackendProtocolError, ProtocolError)
    assert issubclass(BackendProtocolError, ValueError)


# ------------------------------------------------------------------------ audio frames


def test_pcm16_frame_layout_is_exact() -> None:
    payload = bytes(range(256)) * 2 + bytes(128)
    data = encode_audio_frame(AudioFrame("pcm16", 320, payload), 16000)
    assert data[:8] == bytes.fromhex("12 00 0000 00000140")
    assert data[8:] == payload
    assert decode_audio_frame(data, codec="pcm16", sample_rate=16000) == AudioFrame(
        "pcm16", 320, payload
    )


def test_opus_frame_layout_carries_the_marker_flag() -> None:
    data = encode_audio_frame(AudioFrame("opus", 0xFFFFFFFF, OPUS_20MS, marker=True), 48000)
    assert data[:8] == bytes.fromhex("11 01 0000 ffffffff")
    assert decode_audio_frame(data, codec="opus", sample_rate=48000) == AudioFrame(
        "opus", 0xFFFFFFFF, OPUS_20MS, True
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than its 8-byte header"),
        (raw_frame()[:7], "shorter than its 8-byte header"),
        (raw_frame(first=0x22) + bytes(640), "audio frame version 2"),
        (raw_frame(first=0x13) + bytes(640), "codec kind 3"),
        (raw_frame(first=0x11) + OPUS_20MS, "is opus but the session's codec is pcm16"),
        (raw_frame(flags=0x02) + bytes(640), "flags 0x02 set reserved bits"),
        (raw_frame(reserved=1) + bytes(640), "reserved field must be zero"),
        (raw_frame() + bytes(639), "must hold 640 bytes"),
        (raw_frame() + bytes(642), "must hold 640 bytes"),
        (raw_frame(), "must hold 640 bytes"),
    ],
)
def test_malformed_pcm_frames_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BackendProtocolError, match=message) as caught:
        decode_audio_frame(data, codec="pcm16", sample_rate=16000)
    assert caught.value.error_code == ErrorCode.INVALID_AUDIO
    assert caught.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty Opus packet"),
        (bytes([0x70]) + bytes(10), "10 ms"),  # hybrid FB 10 ms
        (bytes([0x79]) + bytes(10), "40 ms"),  # two 20 ms frames
        (bytes([0x79]) + bytes(9), "two equal frames"),
        (bytes([0x7B]), "missing its frame count"),
        (bytes([0x7B, 0x00]), "zero frames"),
        (bytes([0x1B, 0x3F]), "longer than 120 ms"),
        (bytes([0x78]) + bytes(1500), "over the 1500-byte limit"),
    ],
)
def test_opus_frames_must_be_one_20ms_packet(payload: bytes, message: str) -> None:
    with pytest.raises(BackendProtocolError, match=message):
        decode_audio_frame(raw_frame(first=0x11) + payload, codec="opus", sample_rate=48000)


def test_opus_toc_durations_follow_rfc_6716() -> None:
    assert opus_packet_samples(bytes([0x48])) == 960  # SILK WB 20 ms (libopus at 16 kHz)
    assert opus_packet_samples(bytes([0x78])) == 960  # hybrid FB 20 ms
    assert opus_packet_samples(bytes([0xF8])) == 960  # CELT FB 20 ms
    assert opus_packet_samples(bytes([0xE8])) == 240  # CELT FB 5 ms
    assert opus_packet_samples(bytes([0x19, 0, 0])) == 5760  # SILK NB 60 ms, two frames
    assert opus_packet_samples(bytes([0xEB, 0x04])) == 960  # CELT FB 5 ms x 4 (code 3)


def test_frame_encoder_checks_its_input() -> None:
    with pytest.raises(BackendProtocolError, match="timestamp must be in"):
        encode_audio_frame(AudioFrame("pcm16", -1, bytes(640)), 16000)
    with pytest.raises(BackendProtocolError, match="must hold 640 bytes"):
        encode_audio_frame(AudioFrame("pcm16", 0, bytes(320)), 16000)
    with pytest.raises(BackendProtocolError, match="sample rate must be one of"):
        encode_audio_frame(AudioFrame("pcm16", 0, bytes(882)), 44100)
    with pytest.raises(BackendProtocolError, match="codec must be"):
        encode_audio_frame(AudioFrame("g711", 0, bytes(160)), 8000)


# ------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
event_types = st.sampled_from(
    ["session.started", "session.ended", "speech.started", "speech.stopped", "mark.played",
     "mark.cleared", "error", "audio.clear", "mark", "session.end", "", "x"]
)  # fmt: skip
field_names = st.sampled_from(
    ["name", "reason", "code", "message", "timestamp", "call_id", "codec", "sample_rate",
     "channels", "frame_duration_ms", "max_queued_ms", "metadata", "protocol_version", "type"]
)  # fmt: skip
event_documents = st.builds(
    lambda kind, extra: {"type": kind, **extra},
    event_types,
    st.dictionaries(field_names, json_values, max_size=9),
)


@settings(max_examples=400, deadline=None)
@given(event_documents)
def test_decoders_raise_only_protocol_errors_on_event_shaped_json(document: dict) -> None:
    text = json.dumps(document)
    for parse in (parse_backend_event, parse_transceiver_event):
        try:
            event = parse(text)
        except BackendProtocolError:
            continue
        assert parse(encode_event(event)) == event


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_decoders_raise_only_protocol_errors_on_arbitrary_input(data: bytes | str) -> None:
    for parse in (parse_backend_event, parse_transceiver_event):
        with contextlib.suppress(BackendProtocolError):
            parse(data)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=2000),
    st.sampled_from([("opus", 48000), ("pcm16", 8000), ("pcm16", 16000), ("pcm16", 48000)]),
)
def test_frame_decoder_raises_only_protocol_errors(data: bytes, session: tuple) -> None:
    codec, rate = session
    try:
        frame = decode_audio_frame(data, codec=codec, sample_rate=rate)
    except BackendProtocolError:
        return
    assert encode_audio_frame(frame, rate) == data


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0x11, 0x12]),
    st.integers(0, 255),
    st.integers(0, 0xFFFFFFFF),
    st.binary(min_size=1, max_size=1920),
)
def test_frame_decoder_on_plausible_headers(first: int, flags: int, ts: int, body: bytes) -> None:
    data = raw_frame(first=first, flags=flags, ts=ts) + body
    for codec, rate in (("opus", 48000), ("pcm16", 24000)):
        try:
            frame = decode_audio_frame(data, codec=codec, sample_rate=rate)
        except BackendProtocolError:
            continue
        assert frame.timestamp == ts
        assert frame.payload == body
