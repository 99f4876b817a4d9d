"""An aiortc WebRTC caller for tests: WHIP offer/answer, a tone out, the echo analysed.

aiortc is a complete WebRTC stack nobody here wrote, so a call that connects and hears
its own tone back proves our ICE-lite, DTLS, SRTP and RTP against an independent peer.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from dataclasses import dataclass, field

import numpy as np
from aiohttp import ClientSession, ClientTimeout
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960


class ToneTrack(MediaStreamTrack):
    """A sine tone, 20 ms frames in real time (what a microphone would give aiortc)."""

    kind = "audio"

    def __init__(self, frequency: float, amplitude: float = 0.3) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self._samples = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._samples / SAMPLE_RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = (np.arange(FRAME_SAMPLES) + self._samples) / SAMPLE_RATE
        tone = self.amplitude * np.sin(2 * math.pi * self.frequency * t)
        pcm = (tone * 32767).astype(np.int16).reshape(1, -1)
        frame = AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._samples += FRAME_SAMPLES
        return frame


@dataclass
class CallResult:
    status: int = 0
    location: str | None = None
    answer: str = ""
    error: str = ""
    states: list[tuple[float, str]] = field(default_factory=list)
    connected_after: float | None = None
    frames_received: int = 0
    loud_frames: int = 0
    peak_frequencies: list[float] = field(default_factory=list)
    delete_status: int | None = None

    @property
    def connected(self) -> bool:
        return any(state == "connected" for _, state in self.states)

    def dominant_frequency(self) -> float | None:
        if not self.peak_frequencies:
            return None
        return float(np.median(self.peak_frequencies))


def _peak_frequency(frame: AudioFrame) -> tuple[float, float]:
    samples = frame.to_ndarray().astype(np.float64)
    if samples.ndim == 2 and samples.shape[0] == 1 and frame.layout.name == "stereo":
        samples = samples.reshape(-1, 2).mean(axis=1)  # packed stereo s16
    else:
        samples = samples.reshape(-1)
    rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    freqs = np.fft.rfftfreq(samples.size, 1 / frame.sample_rate)
    return float(freqs[int(np.argmax(spectrum[1:])) + 1]), rms


async def whip_call(
    url: str,
    *,
    seconds: float = 2.0,
    frequency: float = 440.0,
    bearer: str | None = None,
    delete: bool = True,
    on_location=None,
) -> CallResult:
    """Call ``url`` (a WHIP endpoint), send a tone for ``seconds``, analyse what comes back."""
    result = CallResult()
    pc = RTCPeerConnection()
    started = time.monotonic()

    @pc.on("connectionstatechange")
    def _on_state() -> None:
        result.states.append((time.monotonic() - started, pc.connectionState))
        if pc.connectionState == "connected" and result.connected_after is None:
            result.connected_after = time.monotonic() - started

    received: asyncio.Queue = asyncio.Queue()

    @pc.on("track")
    def _on_track(track: MediaStreamTrack) -> None:
        received.put_nowait(track)

    pc.addTrack(ToneTrack(frequency))
    headers = {"Content-Type": "application/sdp"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            async with http.post(url, data=pc.localDescription.sdp, headers=headers) as response:
                result.status = response.status
                result.answer = await response.text()
                result.location = response.headers.get("Location")
            if result.status != 201:
                return result
            await pc.setRemoteDescription(RTCSessionDescription(result.answer, "answer"))
            if on_location is not None:
                on_location(result.location)
            track = await asyncio.wait_for(received.get(), 5)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    frame = await asyncio.wait_for(track.recv(), deadline - time.monotonic())
                except (TimeoutError, MediaStreamError):
                    break
                result.frames_received += 1
                peak, rms = _peak_frequency(frame)
                if rms > 500:  # well above Opus noise on silence
                    result.loud_frames += 1
                    result.peak_frequencies.append(peak)
            if delete and result.location:
                target = str(response.url.join(_relative(result.location)))
                delete_headers = {"Authorization": headers["Authorization"]} if bearer else {}
                async with http.delete(target, headers=delete_headers) as response:
                    result.delete_status = response.status
    except Exception as error:  # reported, the test decides
        result.error = f"{type(error).__name__}: {error}"
    finally:
        await pc.close()
    return result


def _relative(location: str):
    from yarl import URL

    return URL(location)
