"""The backend wire protocol, version 1: JSON events and binary audio frames (sans-IO).

An out-of-process backend speaks to the transceiver over one WebSocket per call
(docs/backend-protocol.md is the normative spec; this module is its codec). Text messages
are JSON events, binary messages are audio frames of exactly 20 ms. This module turns
events into text and back, and audio frames into bytes and back; it never touches a
socket or a clock.

Decoding is strict, because a backend is written by someone else, in another language:
an event must be a JSON object whose ``type`` is one the sender may send, carrying exactly
the fields of that type, each of the right JSON type and within its limits. Anything else
raises :class:`BackendProtocolError` (a :class:`ProtocolError`), which names the
``error`` code and WebSocket close code the receiver answers with; no other exception
escapes a decoder. Encoders check the same rules, so we never send what we would reject.

Audio frame layout (all integers big endian; spec section "Audio frames")::

    offset  size  field
    0       1     high nibble: frame version (1); low nibble: codec (1 opus, 2 pcm16)
    1       1     flags: bit 0 marker (first frame of a talkspurt); bits 1-7 zero
    2       2     reserved, zero
    4       4     timestamp: first sample of this frame, in samples at the session's
                  sample rate, modulo 2**32
    8       ...   one 20 ms Opus packet, or 20 ms of mono little-endian int16 PCM
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Final

import orjson

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "AUDIO_HEADER_SIZE",
    "CODEC_OPUS",
    "CODEC_PCM16",
    "FRAME_DURATION_MS",
    "MAX_EVENT_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_OPUS_PAYLOAD",
    "MAX_QUEUED_MS_LIMIT",
    "OPUS_SAMPLE_RATE",
    "PCM16_SAMPLE_RATES",
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "AudioClear",
    "AudioFrame",
    "BackendEvent",
    "BackendProtocolError",
    "CloseCode",
    "ErrorCode",
    "ErrorEvent",
    "Mark",
    "MarkCleared",
    "MarkPlayed",
    "MetadataValue",
    "SessionEnd",
    "SessionEnded",
    "SessionStarted",
    "SpeechStarted",
    "SpeechStopped",
    "TransceiverEvent",
    "decode_audio_frame",
    "encode_audio_frame",
    "encode_event",
    "opus_packet_samples",
    "parse_backend_event",
    "parse_transceiver_event",
    "pcm16_frame_bytes",
]

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "voxrelay.backend.v1"
"""The WebSocket subprotocol the transceiver offers (Sec-WebSocket-Protocol)."""
FRAME_DURATION_MS: Final = 20
CODEC_OPUS: Final = "opus"
CODEC_PCM16: Final = "pcm16"
OPUS_SAMPLE_RATE: Final = 48_000
PCM16_SAMPLE_RATES: Final = (8_000, 12_000, 16_000, 24_000, 48_000)
"""The rates Opus codes natively, so PCM converts to and from Opus without resampling."""
MAX_EVENT_BYTES: Final = 65_536
"""Largest text message (UTF-8 bytes) either side accepts."""
MAX_OPUS_PAYLOAD: Final = 1_500
AUDIO_HEADER_SIZE: Final = 8
MAX_MESSAGE_BYTES: Final = MAX_EVENT_BYTES
"""Largest WebSocket message of any kind; an audio frame is at most 8 + 1920 bytes."""

MAX_CALL_ID_CHARS: Final = 128
MAX_NAME_CHARS: Final = 256
MAX_TEXT_CHARS: Final = 1_024
MAX_METADATA_ENTRIES: Final = 64
MAX_METADATA_KEY_CHARS: Final = 64
MAX_QUEUED_MS_LIMIT: Final = 600_000

_FRAME_VERSION: Final = 1
_CODEC_KINDS: Final = {CODEC_OPUS: 1, CODEC_PCM16: 2}
_KIND_CODECS: Final = {kind: codec for codec, kind in _CODEC_KINDS.items()}
_FLAG_MARKER: Final = 0x01
_HEADER: Final = struct.Struct("!BBHI")
_SAMPLES_PER_OPUS_FRAME: Final = OPUS_SAMPLE_RATE * FRAME_DURATION_MS // 1000
_ERROR_CODE_PATTERN: Final = re.compile(r"[a-z0-9_.]{1,64}")
# Frame length of each Opus TOC configuration in 48 kHz samples (RFC 6716 3.1, table 2):
# SILK NB/MB/WB 10/20/40/60 ms, hybrid SWB/FB 10/20 ms, CELT NB/WB/SWB/FB 2.5/5/10/20 ms.
_OPUS_FRAME_SAMPLES: Final = (480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4
_OPUS_MAX_PACKET_SAMPLES: Final = 5_760  # 120 ms (RFC 6716 3.2.5)


class CloseCode(IntEnum):
    """WebSocket close codes of the protocol (RFC 6455 7.4; 4000-4999 are ours)."""

    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNSUPPORTED_VERSION = 4000
    BACKEND_STALLED = 4001


class ErrorCode:
    """The ``code`` values of ``error`` events the transceiver sends."""

    INVALID_EVENT: Final = "invalid_event"
    INVALID_AUDIO: Final = "invalid_audio"
    MESSAGE_TOO_LARGE: Final = "message_too_large"
    UNSUPPORTED_VERSION: Final = "unsupported_version"
    AUDIO_QUEUE_FULL: Final = "audio_queue_full"
    TOO_MANY_MARKS: Final = "too_many_marks"
    IGNORED_AFTER_END: Final = "ignored_after_end"
    INTERNAL_ERROR: Final = "internal_error"


class BackendProtocolError(ProtocolError):
    """A message (or a value to encode) that breaks the backend wire protocol.

    ``error_code`` and ``close_code`` say how the receiver answers: an ``error`` event with
    that code, then a close with that code (every decoding error is fatal).
    """

    def __init__(
        self,
        message: str,
        error_code: str = ErrorCode.INVALID_EVENT,
        close_code: int = CloseCode.PROTOCOL_ERROR,
    ) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.close_code = close_code


def _audio_error(message: str) -> BackendProtocolError:
    return BackendProtocolError(message, ErrorCode.INVALID_AUDIO)


# ---------------------------------------------------------------------------- events

MetadataValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """Transceiver -> backend, always the first message: what the call's audio is."""

    call_id: str
    codec: str
    sample_rate: int
    max_queued_ms: int
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    channels: int = 1
    frame_duration_ms: int = FRAME_DURATION_MS


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """Transceiver -> backend, the last message: the call is over."""

    reason: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Transceiver -> backend: the caller started speaking at ``timestamp`` (VAD)."""

    timestamp: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """Transceiver -> backend: the caller stopped speaking at ``timestamp`` (VAD)."""

    timestamp: int


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """Transceiver -> backend: playout reached the backend's mark ``name``."""

    name: str


@dataclass(frozen=True, slots=True)
class MarkCleared:
    """Transceiver -> backend: ``audio.clear`` discarded the mark ``name`` unplayed."""

    name: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Either direction: something went wrong; fatal ones are followed by a close."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class AudioClear:
    """Backend -> transceiver: drop all queued audio (barge-in)."""


@dataclass(frozen=True, slots=True)
class Mark:
    """Backend -> transceiver: tell me when playout gets here."""

    name: str


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """Backend -> transceiver: end the call once the queued audio has played."""

    reason: str


TransceiverEvent = (
    SessionStarted
    | SessionEnded
    | SpeechStarted
    | SpeechStopped
    | MarkPlayed
    | MarkCleared
    | ErrorEvent
)
BackendEvent = AudioClear | Mark | SessionEnd | ErrorEvent

Validator = Callable[[str, Any], Any]


def _string(min_chars: int, max_chars: int) -> Validator:
    def check(name: str, value: Any) -> str:
        if type(value) is not str:
            raise BackendProtocolError(f"field {name!r} must be a string")
        if not min_chars <= len(value) <= max_chars:
            raise BackendProtocolError(
                f"field {name!r} must be {min_chars} to {max_chars} characters, got {len(value)}"
            )
        return value

    return check


def _integer(check_value: Callable[[int], bool], rule: str) -> Validator:
    def check(name: str, value: Any) -> int:
        if type(value) is not int:
            raise BackendProtocolError(f"field {name!r} must be an integer ({rule})")
        if not check_value(value):
            raise BackendProtocolError(f"field {name!r} must be {rule}, got {value}")
        return value

    return check


def _error_code(name: str, value: Any) -> str:
    if type(value) is not str or _ERROR_CODE_PATTERN.fullmatch(value) is None:
        raise BackendProtocolError(
            f"field {name!r} must be 1 to 64 characters of a-z, 0-9, '_' and '.'"
        )
    return value


def _codec(name: str, value: Any) -> str:
    if type(value) is not str or value not in (CODEC_OPUS, CODEC_PCM16):
        raise BackendProtocolError(f"field {name!r} must be 'opus' or 'pcm16'")
    return value


def _metadata(name: str, value: Any) -> dict[str, MetadataValue]:
    if not isinstance(value, Mapping):
        raise BackendProtocolError(f"field {name!r} must be an object")
    if len(value) > MAX_METADATA_ENTRIES:
        raise BackendProtocolError(
            f"field {name!r} has {len(value)} entries, at most {MAX_METADATA_ENTRIES} allowed"
        )
    result: dict[str, MetadataValue] = {}
    for key, item in value.items():
        if type(key) is not str or not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
            raise BackendProtocolError(
                f"{name} keys must be strings of 1 to {MAX_METADATA_KEY_CHARS} characters"
            )
        if type(item) is str:
            if len(item) > MAX_TEXT_CHARS:
                raise BackendProtocolError(
                    f"{name}[{key!r}] is longer than {MAX_TEXT_CHARS} characters"
                )
        elif type(item) is int:
            if not -(2**53) < item < 2**53:
                raise BackendProtocolError(f"{name}[{key!r}] is outside the exact range ±2**53")
        elif type(item) is float:
            if not math.isfinite(item):
                raise BackendProtocolError(f"{name}[{key!r}] must be a finite number")
        elif item is not None and type(item) is not bool:
            raise BackendProtocolError(f"{name}[{key!r}] must be a string, number, boolean or null")
        result[key] = item
    return result


_reason = _string(0, MAX_TEXT_CHARS)
_mark_name = _string(1, MAX_NAME_CHARS)
_uint32 = _integer(lambda value: 0 <= value <= 0xFFFFFFFF, "in 0..4294967295")

# Each event type: its class, and a validator per field (the JSON names are the field names).
_SCHEMAS: Final[dict[str, tuple[type, dict[str, Validator]]]] = {
    "session.started": (
        SessionStarted,
        {
            "protocol_version": _integer(lambda v: v == PROTOCOL_VERSION, "1"),
            "call_id": _string(1, MAX_CALL_ID_CHARS),
            "codec": _codec,
            "sample_rate": _integer(
                lambda v: v in PCM16_SAMPLE_RATES, "8000, 12000, 16000, 24000 or 48000"
            ),
            "channels": _integer(lambda v: v == 1, "1"),
            "frame_duration_ms": _integer(lambda v: v == FRAME_DURATION_MS, "20"),
            "max_queued_ms": _integer(lambda v: 0 < v <= MAX_QUEUED_MS_LIMIT, "in 1..600000"),
            "metadata": _metadata,
        },
    ),
    "session.ended": (SessionEnded, {"reason": _reason}),
    "speech.started": (SpeechStarted, {"timestamp": _uint32}),
    "speech.stopped": (SpeechStopped, {"timestamp": _uint32}),
    "mark.played": (MarkPlayed, {"name": _mark_name}),
    "mark.cleared": (MarkCleared, {"name": _mark_name}),
    "error": (ErrorEvent, {"code": _error_code, "message": _string(0, MAX_TEXT_CHARS)}),
    "audio.clear": (AudioClear, {}),
    "mark": (Mark, {"name": _mark_name}),
    "session.end": (SessionEnd, {"reason": _reason}),
}
_TYPE_NAMES: Final = {schema[0]: name for name, schema in _SCHEMAS.items()}
_FROM_TRANSCEIVER: Final = frozenset(
    {
        "session.started",
        "session.ended",
        "speech.started",
        "speech.stopped",
        "mark.played",
        "mark.cleared",
        "error",
    }
)
_FROM_BACKEND: Final = frozenset({"audio.clear", "mark", "session.end", "error"})


def _check_session_started(event: SessionStarted) -> None:
    if event.codec == CODEC_OPUS and event.sample_rate != OPUS_SAMPLE_RATE:
        raise BackendProtocolError(
            f"codec 'opus' has sample_rate {OPUS_SAMPLE_RATE}, got {event.sample_rate}"
        )


def encode_event(event: TransceiverEvent | BackendEvent) -> str:
    """Return the JSON text of ``event``, checked against the same rules as decoding."""
    type_name = _TYPE_NAMES.get(type(event))
    if type_name is None:
        raise BackendProtocolError(f"not a backend protocol event: {event!r}")
    validators = _SCHEMAS[type_name][1]
    document: dict[str, Any] = {"type": type_name}
    for item in fields(event):  # type: ignore[arg-type]
        document[item.name] = validators[item.name](item.name, getattr(event, item.name))
    if isinstance(event, SessionStarted):
        _check_session_started(event)
    try:
        text = orjson.dumps(document)
    except (TypeError, orjson.JSONEncodeError) as error:
        raise BackendProtocolError(f"cannot encode {type_name}: {error}") from None
    if len(text) > MAX_EVENT_BYTES:
        raise BackendProtocolError(
            f"{type_name} encodes to {len(text)} bytes, over the {MAX_EVENT_BYTES}-byte limit",
            ErrorCode.MESSAGE_TOO_LARGE,
            CloseCode.MESSAGE_TOO_BIG,
        )
    return text.decode()


def parse_backend_event(data: str | bytes | bytearray | memoryview) -> BackendEvent:
    """Decode a text message a backend sent (``audio.clear``, ``mark``, ``session.end``,
    ``error``)."""
    return _parse(data, _FROM_BACKEND, "a backend")  # type: ignore[return-value]


def parse_transceiver_event(data: str | bytes | bytearray | memoryview) -> TransceiverEvent:
    """Decode a text message the transceiver sent (what a backend receives)."""
    return _parse(data, _FROM_TRANSCEIVER, "the transceiver")  # type: ignore[return-value]


def _parse(data: Any, allowed: frozenset[str], sender: str) -> Any:
    if isinstance(data, str):
        if len(data) > MAX_EVENT_BYTES:
            raise _too_large(len(data))
        try:
            data = data.encode()
        except UnicodeEncodeError:
            raise BackendProtocolError("event text is not valid Unicode") from None
    elif isinstance(data, bytearray | memoryview):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise BackendProtocolError(f"an event must be text, got {type(data).__name__}")
    if len(data) > MAX_EVENT_BYTES:
        raise _too_large(len(data))
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise BackendProtocolError(f"event is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise BackendProtocolError("an event must be a JSON object")
    type_name = document.get("type")
    if type(type_name) is not str:
        raise BackendProtocolError("an event needs a string field 'type'")
    if type_name not in allowed:
        if type_name in _SCHEMAS:
            raise BackendProtocolError(f"event type {type_name!r} is not one {sender} may send")
        raise BackendProtocolError(f"unknown event type {type_name[:64]!r}")
    cls, validators = _SCHEMAS[type_name]
    for name in document:
        if name != "type" and name not in validators:
            raise BackendProtocolError(f"{type_name} has no field {name[:64]!r}")
    values: dict[str, Any] = {}
    for name, check in validators.items():
        if name not in document:
            raise BackendProtocolError(f"{type_name} is missing field {name!r}")
        values[name] = check(name, document[name])
    event = cls(**values)
    if isinstance(event, SessionStarted):
        _check_session_started(event)
    return event


def _too_large(size: int) -> BackendProtocolError:
    return BackendProtocolError(
        f"event of {size} bytes is over the {MAX_EVENT_BYTES}-byte limit",
        ErrorCode.MESSAGE_TOO_LARGE,
        CloseCode.MESSAGE_TOO_BIG,
    )


# ---------------------------------------------------------------------------- audio


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One binary message: 20 ms of audio and where it sits in the stream."""

    codec: str
    timestamp: int
    payload: bytes
    marker: bool = False


def pcm16_frame_bytes(sample_rate: int) -> int:
    """Bytes of 20 ms of mono int16 PCM at ``sample_rate`` (640 at 16 kHz)."""
    if sample_rate not in PCM16_SAMPLE_RATES:
        raise BackendProtocolError(
            f"pcm16 sample rate must be one of {PCM16_SAMPLE_RATES}, got {sample_rate!r}",
            ErrorCode.INVALID_AUDIO,
        )
    return sample_rate * FRAME_DURATION_MS // 1000 * 2


def opus_packet_samples(packet: bytes | bytearray | memoryview) -> int:
    """Return how many 48 kHz samples an Opus packet holds, from its TOC byte (RFC 6716 3.1).

    Only the framing is checked (TOC, frame count, code 1's even split); whether the
    frames decode is the decoder's business.
    """
    if len(packet) == 0:
        raise _audio_error("empty Opus packet (an Opus packet has at least its TOC byte)")
    toc = packet[0]
    frame_samples = _OPUS_FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        count = 1
    elif code == 1:
        if (len(packet) - 1) % 2:
            raise _audio_error("Opus code 1 packet must split into two equal frames")
        count = 2
    elif code == 2:
        count = 2
    else:
        if len(packet) < 2:
            raise _audio_error("Opus code 3 packet is missing its frame count byte")
        count = packet[1] & 0x3F
        if count == 0:
            raise _audio_error("Opus code 3 packet with zero frames")
    samples = count * frame_samples
    if samples > _OPUS_MAX_PACKET_SAMPLES:
        raise _audio_error(f"Opus packet of {samples} samples is longer than 120 ms")
    return samples


def _check_payload(codec: str, payload: bytes, sample_rate: int) -> None:
    if codec == CODEC_PCM16:
        expected = pcm16_frame_bytes(sample_rate)
        if len(payload) != expected:
            raise _audio_error(
                f"pcm16 frame at {sample_rate} Hz must hold {expected} bytes (20 ms), "
                f"got {len(payload)}"
            )
        return
    if len(payload) > MAX_OPUS_PAYLOAD:
        raise _audio_error(
            f"Opus packet of {len(payload)} bytes is over the {MAX_OPUS_PAYLOAD}-byte limit"
        )
    samples = opus_packet_samples(payload)
    if samples != _SAMPLES_PER_OPUS_FRAME:
        raise _audio_error(
            f"Opus packet holds {samples / 48:g} ms of audio; every frame must be 20 ms"
        )


def encode_audio_frame(frame: AudioFrame, sample_rate: int) -> bytes:
    """Return the binary message for ``frame``, checked like :func:`decode_audio_frame`."""
    kind = _CODEC_KINDS.get(frame.codec)
    if kind is None:
        raise _audio_error(f"codec must be 'opus' or 'pcm16', got {frame.codec!r}")
    if type(frame.timestamp) is not int or not 0 <= frame.timestamp <= 0xFFFFFFFF:
        raise _audio_error(f"timestamp must be in 0..2**32-1, got {frame.timestamp!r}")
    _check_payload(frame.codec, frame.payload, sample_rate)
    flags = _FLAG_MARKER if frame.marker else 0
    return _HEADER.pack(_FRAME_VERSION << 4 | kind, flags, 0, frame.timestamp) + frame.payload


def decode_audio_frame(
    data: bytes | bytearray | memoryview, *, codec: str, sample_rate: int
) -> AudioFrame:
    """Decode a binary message of a session whose audio is ``codec`` at ``sample_rate``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _audio_error(f"an audio frame must be bytes, got {type(data).__name__}")
    if len(data) < AUDIO_HEADER_SIZE:
        raise _audio_error(
            f"audio frame of {len(data)} bytes is shorter than its {AUDIO_HEADER_SIZE}-byte header"
        )
    format_byte, flags, reserved, timestamp = _HEADER.unpack_from(data)
    version, kind = format_byte >> 4, format_byte & 0x0F
    if version != _FRAME_VERSION:
        raise _audio_error(f"audio frame version {version}; this protocol version uses 1")
    frame_codec = _KIND_CODECS.get(kind)
    if frame_codec is None:
        raise _audio_error(f"audio frame codec kind {kind} is not 1 (opus) or 2 (pcm16)")
    if frame_codec != codec:
        raise _audio_error(f"audio frame is {frame_codec} but the session's codec is {codec}")
    if flags & ~_FLAG_MARKER:
        raise _audio_error(f"audio frame flags 0x{flags:02x} set reserved bits")
    if reserved:
        raise _audio_error(f"audio frame reserved field must be zero, got 0x{reserved:04x}")
    payload = bytes(data[AUDIO_HEADER_SIZE:])
    _check_payload(codec, payload, sample_rate)
    return AudioFrame(codec, timestamp, payload, bool(flags & _FLAG_MARKER))
