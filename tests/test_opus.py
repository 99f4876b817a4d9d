"""The libopus binding: real libopus, checked against FFmpeg's own Opus decoder and encoder.

FFmpeg's native ``opus`` decoder is an independent implementation, so a tone that survives
our encoder and its decoder (and the other way round) shows the binding hands libopus the
right buffers, rates and sizes.
"""

from __future__ import annotations

import math
import os
import struct
from fractions import Fraction

import av
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.engine import opus
from voxrelay.engine.backend_client import _OpusToPcm, _PcmToOpus
from voxrelay.engine.opus import (
    OPUS_RATES,
    OpusDecoder,
    OpusEncoder,
    OpusError,
    OpusUnavailable,
    libopus_version,
)


def tone(rate: int, frames: int, hz: float = 440.0, amplitude: int = 8000) -> list[bytes]:
    """``frames`` 20 ms frames of a sine tone as mono int16 PCM at ``rate``."""
    per_frame = rate // 50
    return [
        struct.pack(
            f"<{per_frame}h",
            *(
                int(amplitude * math.sin(2 * math.pi * hz * n / rate))
                for n in range(index * per_frame, (index + 1) * per_frame)
            ),
        )
        for index in range(frames)
    ]


def samples_of(pcm: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(pcm) // 2}h", pcm))


def rms(samples: list[int]) -> float:
    return math.sqrt(sum(value * value for value in samples) / len(samples))


def dominant_hz(samples: list[int], rate: int) -> float:
    """The tone's frequency from its rising zero crossings."""
    crossings = [i for i in range(1, len(samples)) if samples[i - 1] < 0 <= samples[i]]
    return (len(crossings) - 1) * rate / (crossings[-1] - crossings[0])


def test_the_library_loads_and_says_its_version() -> None:
    assert libopus_version().startswith("libopus ")


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_a_tone_survives_encoding_and_decoding_at_every_session_rate(rate: int) -> None:
    encoder, decoder = OpusEncoder(rate, 32_000), OpusDecoder(rate)
    decoded = b"".join(decoder.decode(encoder.encode(frame)) for frame in tone(rate, 25))
    assert len(decoded) == 25 * rate // 50 * 2
    settled = samples_of(decoded)[len(decoded) // 4 :]  # past the codec's start-up
    assert 8000 / math.sqrt(2) / 2 < rms(settled) < 8000 / math.sqrt(2) * 2
    assert dominant_hz(settled, rate) == pytest.approx(440, rel=0.02)


def test_our_packets_decode_with_ffmpegs_own_opus_decoder() -> None:
    encoder = OpusEncoder(16_000, 32_000)
    packets = [encoder.encode(frame) for frame in tone(16_000, 25)]
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate, decoder.layout = 48_000, "mono"
    frames = [frame for packet in packets for frame in decoder.decode(av.Packet(packet))]
    assert sum(frame.samples for frame in frames) == 25 * 960
    decoded = [int(32767 * value) for frame in frames[5:] for value in frame.to_ndarray()[0]]
    assert dominant_hz(decoded, 48_000) == pytest.approx(440, rel=0.02)


def test_ffmpeg_encoded_48khz_packets_decode_straight_to_16khz() -> None:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48_000, "mono", "s16"
    encoder.time_base = Fraction(1, 48_000)
    encoder.open()
    packets = []
    for index, pcm in enumerate(tone(48_000, 25)):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(pcm)
        frame.sample_rate, frame.pts = 48_000, index * 960
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    decoder = OpusDecoder(16_000)
    decoded = [decoder.decode(packet) for packet in packets]
    assert {len(pcm) for pcm in decoded} == {640}  # 20 ms at 16 kHz, no resampler needed
    settled = samples_of(b"".join(decoded[5:]))
    assert dominant_hz(settled, 16_000) == pytest.approx(440, rel=0.02)


def test_stereo_packets_are_mixed_down_to_mono() -> None:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48_000, "stereo", "s16"
    encoder.open()
    packets = []
    for index, pcm in enumerate(tone(48_000, 10)):
        frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
        left = struct.unpack("<960h", pcm)
        frame.planes[0].update(struct.pack("<1920h", *(v for s in left for v in (s, s))))
        frame.sample_rate, frame.pts = 48_000, index * 960
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    decoder = OpusDecoder(16_000)
    decoded = [decoder.decode(packet) for packet in packets]
    assert {len(pcm) for pcm in decoded} == {640}
    assert dominant_hz(samples_of(b"".join(decoded[3:])), 16_000) == pytest.approx(440, rel=0.02)


def test_corrupt_packets_and_wrong_frames_raise_opus_errors() -> None:
    decoder = OpusDecoder(16_000)
    with pytest.raises(OpusError, match="empty packet"):
        decoder.decode(b"")
    with pytest.raises(OpusError, match="corrupted stream"):
        decoder.decode(b"\xff\xff\xff")  # code 3 with a frame count of 63: impossible
    encoder = OpusEncoder(16_000, 24_000)
    with pytest.raises(OpusError, match="holds 640 bytes, got 638"):
        encoder.encode(bytes(638))
    assert len(decoder.decode(encoder.encode(bytearray(640)))) == 640  # any buffer type


def test_settings_libopus_cannot_take_are_refused_up_front() -> None:
    with pytest.raises(OpusError, match="sample rate must be one of"):
        OpusDecoder(44_100)
    with pytest.raises(OpusError, match="sample rate must be one of"):
        OpusEncoder(22_050, 32_000)
    with pytest.raises(OpusError, match="bitrate must be 500-512000"):
        OpusEncoder(16_000, 100)
    with pytest.raises(OpusError, match="complexity must be 0-10"):
        OpusEncoder(16_000, 32_000, complexity=11)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=1500))
def test_hostile_packets_decode_or_raise_never_crash(packet: bytes) -> None:
    decoder = OpusDecoder(16_000)
    try:
        pcm = decoder.decode(packet)
    except OpusError:
        return
    assert len(pcm) % 2 == 0 and len(pcm) <= decoder.max_samples * 2


def test_a_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opus, "_candidates", lambda: ["/nonexistent/libopus.so.0"])
    opus._lib.cache_clear()
    try:
        with pytest.raises(OpusUnavailable, match=r"libopus not found.*/nonexistent/libopus"):
            OpusDecoder(16_000)
    finally:
        monkeypatch.undo()
        opus._lib.cache_clear()
    assert OpusDecoder(16_000).sample_rate == 16_000


def test_per_call_transcoders_start_no_threads() -> None:
    """FFmpeg's filter graphs started two threads each, four per call: libopus starts none."""
    before = len(os.listdir("/proc/self/task"))
    calls = [(_OpusToPcm(16_000), _PcmToOpus(16_000, 32_000)) for _ in range(10)]
    source = OpusEncoder(48_000, 32_000)
    for pcm in tone(48_000, 5):
        packet = source.encode(pcm)
        for decoder, encoder in calls:
            for frame, _ in decoder.decode(packet, 0):
                assert len(encoder.encode(frame)) == 1
    assert len(os.listdir("/proc/self/task")) == before


def test_caller_gaps_become_silence_and_long_packets_split_into_frames() -> None:
    source = OpusEncoder(48_000, 32_000)
    decoder = _OpusToPcm(16_000)
    first = decoder.decode(source.encode(tone(48_000, 1)[0]), 0)
    assert [timestamp for _, timestamp in first] == [0]
    # 40 ms missing before the next packet: two frames of silence, then the packet's frame.
    after_gap = decoder.decode(source.encode(tone(48_000, 1)[0]), 1920)
    assert [timestamp for _, timestamp in after_gap] == [320, 640, 960]
    assert after_gap[0][0] == bytes(640) and after_gap[1][0] == bytes(640)
    # A 60 ms packet (from another encoder) is three frames.
    long_packets = av.CodecContext.create("libopus", "w")
    long_packets.sample_rate, long_packets.layout, long_packets.format = 48_000, "mono", "s16"
    long_packets.options = {"frame_duration": "60"}
    long_packets.open()
    frame = av.AudioFrame(format="s16", layout="mono", samples=2880)
    frame.planes[0].update(b"".join(tone(48_000, 3)))
    frame.sample_rate, frame.pts = 48_000, 0
    packets = [bytes(p) for p in long_packets.encode(frame)] + [
        bytes(p) for p in long_packets.encode(None)
    ]
    frames = [f for packet in packets for f in decoder.decode(packet, 0)]
    assert [timestamp for _, timestamp in frames][:3] == [1280, 1600, 1920]
    assert all(len(pcm) == 640 for pcm, _ in frames)
