"""An example voice agent: listens for the end of the caller's turn, answers, yields to barge-in.

It is the smallest complete turn-taking agent over the backend protocol, and a template
for real ones (replace :meth:`Conversation.reply_audio` with STT -> LLM -> TTS):

1. **Listen.** Caller audio (pcm16, 16 kHz) is kept while the caller speaks. Turn
   boundaries come from the transceiver's ``speech.started`` / ``speech.stopped`` events
   when it runs VAD; until the first such event the agent runs the same detector itself
   (:mod:`voxrelay.proto.vad`), so it also works behind a transceiver without VAD.
2. **Answer** when the turn ends: a spoken sentence from ``espeak-ng`` when it is
   installed (else a two-tone chime), then the caller's own words played back. Audio is
   sent faster than real time (the transceiver paces it), with a ``mark`` every second
   and at the end, so the agent learns what the caller actually heard.
3. **Yield.** When the caller starts speaking while the agent talks, it sends
   ``audio.clear`` at once (the transceiver may already have cleared on its own barge-in)
   and starts listening to the new turn. ``mark.played`` / ``mark.cleared`` tell it how
   far the interrupted answer got.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from voxrelay.backends.service import accept_call, serve_app
from voxrelay.proto.backend_wire import (
    CODEC_PCM16,
    AudioClear,
    AudioFrame,
    BackendProtocolError,
    Mark,
    MarkCleared,
    MarkPlayed,
    SessionEnded,
    SpeechStarted,
    SpeechStopped,
    decode_audio_frame,
    encode_audio_frame,
    encode_event,
    parse_transceiver_event,
)
from voxrelay.proto.vad import SpeechStarted as VadStarted
from voxrelay.proto.vad import VoiceActivityDetector

log = logging.getLogger("voxrelay.backends.agent")

__all__ = ["Conversation", "serve"]

FRAME_SECONDS = 0.02
MAX_TURN_SECONDS = 8.0
PRE_ROLL_FRAMES = 10  # 200 ms kept from before speech was detected


@dataclass
class Conversation:
    """One call's turn-taking state (sans-IO apart from the optional espeak-ng call)."""

    sample_rate: int
    espeak: str | None = field(default_factory=lambda: shutil.which("espeak-ng"))
    turn: list[bytes] = field(default_factory=list)
    pre_roll: list[bytes] = field(default_factory=list)
    listening: bool = False
    replies: int = 0
    pending_marks: list[str] = field(default_factory=list)
    heard_marks: list[str] = field(default_factory=list)
    cleared_marks: list[str] = field(default_factory=list)
    transceiver_vad: bool = False
    local_vad: VoiceActivityDetector = field(
        default_factory=lambda: VoiceActivityDetector(start_frames=2, hangover=0.6)
    )

    @property
    def frame_bytes(self) -> int:
        return self.sample_rate // 50 * 2

    @property
    def speaking(self) -> bool:
        """The agent has an answer still playing (marks not yet played or cleared)."""
        return bool(self.pending_marks)

    def caller_frame(self, pcm: bytes) -> None:
        if self.listening:
            if len(self.turn) * FRAME_SECONDS < MAX_TURN_SECONDS:
                self.turn.append(pcm)
        else:
            self.pre_roll.append(pcm)
            del self.pre_roll[:-PRE_ROLL_FRAMES]

    def turn_started(self) -> None:
        self.listening = True
        self.turn = list(self.pre_roll)
        self.pre_roll.clear()

    def turn_ended(self) -> list[bytes]:
        """The caller finished: the answer, as 20 ms frames."""
        self.listening = False
        heard, self.turn = self.turn, []
        self.replies += 1
        return self.reply_audio(heard)

    def reply_audio(self, heard: list[bytes]) -> list[bytes]:
        seconds = len(heard) * FRAME_SECONDS
        spoken = self._speak(f"You spoke for {seconds:.1f} seconds. Here is what I heard.")
        audio = spoken if spoken is not None else self._chime()
        audio += bytes(self.frame_bytes * 10)  # 200 ms pause
        audio += b"".join(heard)
        usable = len(audio) - len(audio) % self.frame_bytes
        return [audio[i : i + self.frame_bytes] for i in range(0, usable, self.frame_bytes)]

    def _chime(self) -> bytes:
        out = bytearray()
        rate = self.sample_rate
        for frequency in (660.0, 880.0):
            n = int(rate * 0.15)
            fade = int(rate * 0.01)
            for i in range(n):
                envelope = min(1.0, i / fade, (n - i) / fade)
                value = 0.3 * 32767 * envelope * math.sin(2 * math.pi * frequency * i / rate)
                out += struct.pack("<h", int(value))
        return bytes(out)

    def _speak(self, text: str) -> bytes | None:
        """Synthesize ``text`` with espeak-ng at our sample rate, or None if unavailable."""
        if self.espeak is None:
            return None
        try:
            wav = subprocess.run(
                [self.espeak, "--stdout", "-s", "170", text],
                capture_output=True,
                timeout=5,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return _resample_wav(wav, self.sample_rate)


def _resample_wav(wav: bytes, rate: int) -> bytes | None:
    """Mono 16-bit WAV at any rate -> raw PCM at ``rate`` (linear interpolation)."""
    import numpy as np

    if len(wav) < 44 or wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        return None
    source_rate = struct.unpack_from("<I", wav, 24)[0]
    data = wav.find(b"data")
    if data < 0 or not source_rate:
        return None
    samples = np.frombuffer(wav[data + 8 :][: (len(wav) - data - 8) // 2 * 2], dtype="<i2")
    if not samples.size:
        return None
    count = int(samples.size * rate / source_rate)
    positions = np.linspace(0, samples.size - 1, count)
    return np.interp(positions, np.arange(samples.size), samples).astype("<i2").tobytes()


async def _call(request: web.Request) -> web.WebSocketResponse:
    # This agent works on PCM: configure the transceiver's backend with codec pcm16.
    ws, started = await accept_call(request, codecs=(CODEC_PCM16,))
    if started is None:
        return ws
    call_id = started.call_id
    conversation = Conversation(started.sample_rate)
    rate = started.sample_rate
    sent_samples = 0

    async def say(frames: list[bytes]) -> None:
        nonlocal sent_samples
        reply = conversation.replies
        for index, pcm in enumerate(frames):
            frame = AudioFrame(CODEC_PCM16, sent_samples & 0xFFFFFFFF, pcm)
            await ws.send_bytes(encode_audio_frame(frame, rate))
            sent_samples += len(pcm) // 2
            if (index + 1) % 50 == 0:
                await mark(f"reply-{reply}-{(index + 1) // 50}s")
        await mark(f"reply-{reply}-end")

    async def mark(name: str) -> None:
        conversation.pending_marks.append(name)
        await ws.send_str(encode_event(Mark(name)))

    async def barge_in() -> None:
        if conversation.speaking:
            log.info("caller barged in", extra={"call": call_id})
            await ws.send_str(encode_event(AudioClear()))

    async def on_turn_start() -> None:
        await barge_in()
        conversation.turn_started()

    async def on_turn_end() -> None:
        if conversation.listening:
            await say(conversation.turn_ended())

    async for message in ws:
        if message.type is WSMsgType.BINARY:
            try:
                frame = decode_audio_frame(message.data, codec=CODEC_PCM16, sample_rate=rate)
            except BackendProtocolError:
                continue
            conversation.caller_frame(frame.payload)
            if not conversation.transceiver_vad:
                vad = conversation.local_vad
                vad.process(frame.payload, asyncio.get_running_loop().time())
                while (event := vad.next_event()) is not None:
                    if isinstance(event, VadStarted):
                        await on_turn_start()
                    else:
                        await on_turn_end()
        elif message.type is WSMsgType.TEXT:
            try:
                event = parse_transceiver_event(message.data)
            except BackendProtocolError:
                continue
            if isinstance(event, SpeechStarted):
                conversation.transceiver_vad = True
                await on_turn_start()
            elif isinstance(event, SpeechStopped):
                conversation.transceiver_vad = True
                await on_turn_end()
            elif isinstance(event, MarkPlayed | MarkCleared):
                if event.name in conversation.pending_marks:
                    conversation.pending_marks.remove(event.name)
                target = (
                    conversation.heard_marks
                    if isinstance(event, MarkPlayed)
                    else conversation.cleared_marks
                )
                target.append(event.name)
            elif isinstance(event, SessionEnded):
                break
    log.info(
        "call over",
        extra={
            "call": call_id,
            "replies": conversation.replies,
            "marks_played": conversation.heard_marks,
            "marks_cleared": conversation.cleared_marks,
        },
    )
    return ws


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    await serve_app(_call, host, port, name="agent", ready=ready)
