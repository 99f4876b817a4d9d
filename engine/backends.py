"""The in-process backend interface of a transceiver, and the echo backend.

A backend sees a call as a :class:`Call` handle: it is told when the call starts, gets the
caller's audio frame by frame, sends audio back through the handle, and is told when the
call ends and why. The transceiver calls these methods on its event loop, so they must not
block; a backend that needs to wait hands the work to a task of its own.

Out-of-process backends (model servers, STT/TTS pipelines) sit behind the backend wire
protocol, which an adapter implementing this same interface speaks.
"""

from __future__ import annotations

from typing import Protocol

from voxrelay.proto.session import SAMPLES_PER_FRAME, AudioReceived

__all__ = ["Backend", "Call", "EchoBackend"]


class Call(Protocol):
    """What a backend may do with a call (implemented by the transceiver)."""

    @property
    def id(self) -> str: ...

    def send_audio(self, payload: bytes, samples: int = SAMPLES_PER_FRAME) -> bool:
        """Send one Opus frame of ``samples`` 48 kHz samples; False if the call is not up."""
        ...

    def close(self, reason: str) -> None: ...


class Backend(Protocol):
    def call_started(self, call: Call) -> None: ...

    def audio_received(self, call: Call, frame: AudioReceived) -> None: ...

    def call_ended(self, call: Call, reason: str) -> None: ...


class EchoBackend:
    """Sends every caller frame straight back, the simplest backend there is.

    Timing needs no care here: the session stamps each frame it sends, and after a pause
    (Opus DTX sends one frame per 400 ms in silence) it advances the RTP timestamp by the
    time that really passed, so the caller's jitter buffer sees the gap where it was.
    """

    def call_started(self, call: Call) -> None:
        pass

    def audio_received(self, call: Call, frame: AudioReceived) -> None:
        call.send_audio(frame.payload)

    def call_ended(self, call: Call, reason: str) -> None:
        pass
