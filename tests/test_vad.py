"""Voice activity detection with a fake clock: start, hangover, noise floor, DTX gaps."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxrelay.proto import vad
from voxrelay.proto.vad import SpeechStarted, SpeechStopped, VoiceActivityDetector, frame_level

FRAME = 0.02


def tone(amplitude: float, samples: int = 960, frequency: float = 220.0) -> bytes:
    return struct.pack(
        f"<{samples}h",
        *(
            int(amplitude * 32767 * math.sin(2 * math.pi * frequency * i / 48000))
            for i in range(samples)
        ),
    )


SPEECH = tone(0.3)
QUIET = tone(0.0005)  # about -69 dBFS: room noise
SILENCE = bytes(1920)


def feed(detector: VoiceActivityDetector, frame: bytes, start: float, count: int) -> float:
    now = start
    for _ in range(count):
        detector.process(frame, now)
        now += FRAME
    return now


def events(detector: VoiceActivityDetector) -> list:
    out = []
    while (event := detector.next_event()) is not None:
        out.append(event)
    return out


def test_levels_in_dbfs():
    assert frame_level(SILENCE) == -120.0
    assert frame_level(b"") == -120.0
    assert frame_level(tone(1.0)) == pytest.approx(-3.0, abs=0.1)  # full-scale sine
    assert frame_level(tone(0.1)) == pytest.approx(-23.0, abs=0.2)


def test_pure_python_level_matches_numpy(monkeypatch):
    expected = frame_level(SPEECH)
    monkeypatch.setattr(vad, "_numpy", None)
    assert frame_level(SPEECH) == pytest.approx(expected, abs=1e-6)


def test_speech_starts_after_start_frames_and_stops_after_hangover():
    detector = VoiceActivityDetector(start_frames=3, hangover=0.5)
    now = feed(detector, QUIET, 0.0, 50)
    assert events(detector) == []
    speech_at = now
    now = feed(detector, SPEECH, now, 2)
    assert events(detector) == [] and not detector.speaking  # two loud frames: not yet
    now = feed(detector, SPEECH, now, 48)
    assert events(detector) == [SpeechStarted(speech_at)]
    last_loud = now - FRAME
    now = feed(detector, QUIET, now, 24)  # 0.48 s of quiet: a pause between words
    assert events(detector) == []
    now = feed(detector, QUIET, now, 2)
    (stopped,) = events(detector)
    assert isinstance(stopped, SpeechStopped)
    assert stopped.at == pytest.approx(last_loud + 0.5, abs=FRAME)
    assert stopped.duration == pytest.approx(last_loud - speech_at)


def test_a_single_click_is_not_speech():
    detector = VoiceActivityDetector(start_frames=3)
    now = feed(detector, QUIET, 0.0, 20)
    for _ in range(10):
        now = feed(detector, SPEECH, now, 1)
        now = feed(detector, QUIET, now, 5)
    assert events(detector) == [] and not detector.speaking


def test_turn_ends_on_time_when_frames_stop_arriving():
    detector = VoiceActivityDetector(hangover=0.6)
    now = feed(detector, SPEECH, 0.0, 20)
    assert isinstance(events(detector)[0], SpeechStarted)
    due = detector.get_timer()
    assert due == pytest.approx(now - FRAME + 0.6)
    detector.handle_timer(due - 0.001)
    assert events(detector) == []
    detector.handle_timer(due)
    (stopped,) = events(detector)
    assert isinstance(stopped, SpeechStopped) and detector.get_timer() is None


def test_noise_floor_adapts_so_steady_noise_is_not_speech():
    detector = VoiceActivityDetector(threshold_dbfs=-50, margin_db=12, noise_adapt=0.2)
    noisy = tone(0.02)  # about -37 dBFS: loud enough to pass the absolute threshold
    now = feed(detector, SILENCE, 0.0, 5)
    now = feed(detector, noisy, now, 5)
    now = feed(detector, noisy, now, 400)  # 8 s of a fan that stays on
    assert detector.noise_floor_dbfs == pytest.approx(frame_level(noisy), abs=3.0)
    assert not detector.speaking  # the step counted as speech at first, then was learned
    events(detector)
    now = feed(detector, tone(0.5), now, 5)  # real speech well above the floor
    assert any(isinstance(e, SpeechStarted) for e in events(detector))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        VoiceActivityDetector(start_frames=0)
    with pytest.raises(ValueError):
        VoiceActivityDetector(hangover=0)


@given(st.lists(st.binary(max_size=2000), max_size=40))
def test_any_bytes_never_raise(frames):
    detector = VoiceActivityDetector()
    now = 0.0
    for frame in frames:
        detector.process(frame, now)
        now += FRAME
    events(detector)
