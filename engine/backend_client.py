"""Out-of-process backends: each call's audio over its own WebSocket (docs/backend-protocol.md).

:class:`WebSocketBackend` implements the in-process :class:`~voxrelay.engine.backends.Backend`
interface by bridging every call to a backend service: when a call starts it opens a
WebSocket to the configured URL and sends ``session.started``; each caller frame goes out
as a binary message; the backend's audio is queued in a
:class:`~voxrelay.proto.playout.PlayoutQueue` and played to the caller one 20 ms frame per
tick by a timer task of the call's own; ``audio.clear``, ``mark`` and ``session.end`` act
on that queue, and ``mark.played`` goes back when playout reaches a mark.

Isolation is the point of the design. Every call has its own socket and tasks, and every
queue is bounded, so a backend connection that is slow, silent or broken can only end its
own call: caller audio it does not read in time is dropped and counted; a write blocked for
``write_timeout`` ends the call as "backend stalled"; garbage ends it as "backend protocol
error"; a lost connection as "backend disconnected". The transceiver's loop never waits on
a backend.

Codecs: with ``codec="opus"`` the caller's Opus packets pass through untouched and the
backend's Opus packets go out untouched. With ``codec="pcm16"`` the transceiver decodes the
caller to 20 ms frames of mono int16 PCM at ``sample_rate`` and encodes the backend's PCM
to Opus, with libopus (:mod:`voxrelay.engine.opus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from voxrelay.engine.backends import Call
from voxrelay.engine.opus import OpusDecoder, OpusEncoder, OpusError, libopus_version
from voxrelay.proto.backend_wire import (
    CODEC_OPUS,
    CODEC_PCM16,
    MAX_MESSAGE_BYTES,
    MAX_QUEUED_MS_LIMIT,
    OPUS_SAMPLE_RATE,
    PCM16_SAMPLE_RATES,
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
    MetadataValue,
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
    pcm16_frame_bytes,
)
from voxrelay.proto.playout import FrameDue, PlayoutQueue
from voxrelay.proto.session import SAMPLES_PER_FRAME, AudioReceived
from voxrelay.proto.vad import SpeechStarted as VadSpeechStarted
from voxrelay.proto.vad import VoiceActivityDetector

__all__ = ["WebSocketBackend", "WebSocketBackendSettings"]

log = logging.getLogger("voxrelay.backend")

FRAME_DURATION = 0.02
_VAD_SAMPLE_RATE = 16_000  # plenty for speech energy, a third of the decode work
_MAX_SILENCE_FILL = OPUS_SAMPLE_RATE  # at most 1 s of silence stands in for a caller gap


@dataclass(frozen=True, slots=True)
class WebSocketBackendSettings:
    """Where the backend is and how patient to be with it."""

    url: str
    """``ws://`` or ``wss://`` URL; every call opens its own connection to it."""
    codec: str = CODEC_OPUS
    sample_rate: int = OPUS_SAMPLE_RATE
    """48000 for opus; for pcm16 one of 8000, 12000, 16000, 24000, 48000."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra HTTP headers of the WebSocket handshake (e.g. Authorization)."""
    connect_timeout: float = 5.0
    heartbeat: float = 10.0
    """Seconds between WebSocket pings; no pong within half of it ends the call."""
    write_timeout: float = 5.0
    """A single write to the backend blocked this long ends the call (backend stalled)."""
    close_timeout: float = 2.0
    """How long the goodbye (flush, session.ended, close handshake) may take."""
    max_queued: float = 30.0
    """Seconds of backend audio held for playout; more is dropped (audio_queue_full)."""
    max_marks: int = 1024
    caller_buffer: float = 1.0
    """Seconds of caller audio held while the backend reads slowly; older is dropped."""
    max_pending_events: int = 256
    """Events waiting to be written; a backend that lets more pile up is stalled."""
    opus_bitrate: int = 32_000
    """Bits per second of the Opus encoder (pcm16 only)."""
    vad: bool = False
    """Run voice activity detection on the caller's audio and send speech.started /
    speech.stopped (proto/vad.py; decodes the caller's Opus when the codec is opus)."""
    barge_in: bool = True
    """With vad: when the caller starts speaking, empty the playout queue at once (as
    audio.clear would), so the agent stops within a frame instead of a backend round trip
    later. The backend still gets speech.started, and mark.cleared for dropped marks."""
    vad_threshold_dbfs: float = -45.0
    vad_start_frames: int = 2
    """Loud 20 ms frames in a row that start speech (2: detected 20 ms after it begins)."""
    vad_hangover: float = 0.6
    """Seconds of quiet that end the caller's turn (speech.stopped)."""

    def __post_init__(self) -> None:
        if self.codec not in (CODEC_OPUS, CODEC_PCM16):
            raise ValueError(f"backend codec must be 'opus' or 'pcm16', got {self.codec!r}")
        if self.codec == CODEC_OPUS and self.sample_rate != OPUS_SAMPLE_RATE:
            raise ValueError(f"codec opus runs at {OPUS_SAMPLE_RATE} Hz, got {self.sample_rate}")
        if self.sample_rate not in PCM16_SAMPLE_RATES:
            raise ValueError(
                f"backend sample_rate must be one of {PCM16_SAMPLE_RATES}, got {self.sample_rate}"
            )
        if not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"backend url must start with ws:// or wss://, got {self.url!r}")
        if not 0 < self.max_queued * 1000 <= MAX_QUEUED_MS_LIMIT:
            raise ValueError(f"max_queued must be in (0, 600] seconds, got {self.max_queued}")
        for name in ("connect_timeout", "heartbeat", "write_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.vad:
            VoiceActivityDetector(  # raises ValueError for bad VAD settings, at startup
                threshold_dbfs=self.vad_threshold_dbfs,
                start_frames=self.vad_start_frames,
                hangover=self.vad_hangover,
            )


MetadataSource = Callable[[Call], Mapping[str, MetadataValue]]


class WebSocketBackend:
    """The Backend of a transceiver whose calls are served by a WebSocket backend service.

    Call its methods on the transceiver's event loop. ``counters`` totals what happened
    over all calls (connects, failures by reason, frames dropped); ``await close()`` at
    shutdown lets the calls' goodbyes finish and closes the HTTP client.
    """

    def __init__(
        self,
        settings: WebSocketBackendSettings,
        *,
        metadata: MetadataSource | None = None,
        client: aiohttp.ClientSession | None = None,
    ) -> None:
        if settings.codec == CODEC_PCM16 or settings.vad:
            libopus_version()  # fail at startup, not at the first call, without libopus
        self.settings = settings
        self._metadata = metadata
        self._client = client
        self._own_client = client is None
        self.links: dict[str, _CallLink] = {}
        self.counters: Counter[str] = Counter()
        self._closing: set[asyncio.Task[None]] = set()
        self._write_watchdog: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ Backend

    def call_started(self, call: Call) -> None:
        loop = asyncio.get_running_loop()
        try:
            metadata = dict(self._metadata(call)) if self._metadata is not None else {}
            started = encode_event(
                SessionStarted(
                    call_id=call.id,
                    codec=self.settings.codec,
                    sample_rate=self.settings.sample_rate,
                    max_queued_ms=round(self.settings.max_queued * 1000),
                    metadata=metadata,
                )
            )
        except Exception as error:  # the operator's metadata hook must not break create_call
            self.counters["calls_failed:backend error"] += 1
            log.error("cannot describe the call to the backend: %s", error, extra={"call": call.id})
            loop.call_soon(call.close, f"backend error: {error}")
            return
        self.links[call.id] = _CallLink(self, call, started, loop)
        self.counters["calls_started"] += 1
        if self._write_watchdog is None:
            self._write_watchdog = loop.call_later(self._watchdog_interval, self._watch_writes)

    def audio_received(self, call: Call, frame: AudioReceived) -> None:
        link = self.links.get(call.id)
        if link is not None:
            link.caller_audio(frame)

    def call_ended(self, call: Call, reason: str) -> None:
        link = self.links.pop(call.id, None)
        if link is not None:
            link.call_over(reason)

    # ------------------------------------------------------------------ extras

    def call_connected(self, call: Call) -> None:
        """The call's media is up: playout may start before the caller's first frame.

        Without this, playout waits for the first caller frame, since audio sent to a
        call that is not connected yet would be lost.
        """
        link = self.links.get(call.id)
        if link is not None:
            link.media_up()

    @property
    def active_calls(self) -> int:
        return len(self.links)

    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),  # one socket per call: no pool cap
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
            )
        return self._client

    @property
    def _watchdog_interval(self) -> float:
        return min(1.0, self.settings.write_timeout / 4)

    def _watch_writes(self) -> None:
        """End the calls whose write has waited ``write_timeout`` (their backend reads
        nothing). One sweep over the links per interval, rather than a timeout armed and
        cancelled around every frame each call writes."""
        loop = asyncio.get_running_loop()
        limit = loop.time() - self.settings.write_timeout
        for link in list(self.links.values()):  # write_stalled() removes the link
            since = link.writing_since
            if since is not None and since <= limit:
                link.write_stalled()
        self._write_watchdog = (
            loop.call_later(self._watchdog_interval, self._watch_writes) if self.links else None
        )

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a call's goodbye task alive until it ends, so close() can wait for it."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Wait (bounded) for the goodbyes in flight, then close our HTTP client."""
        if self._write_watchdog is not None:
            self._write_watchdog.cancel()
            self._write_watchdog = None
        for link in list(self.links.values()):
            link.call_over("transceiver stopping")
        self.links.clear()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=self.settings.close_timeout + 1)
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None


class _CallLink:
    """One call's WebSocket, its writer, reader and playout tasks, and their queues."""

    def __init__(
        self,
        backend: WebSocketBackend,
        call: Call,
        session_started: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        settings = backend.settings
        self.backend = backend
        self.call = call
        self.settings = settings
        self.loop = loop
        self.counters = backend.counters
        self.playout = PlayoutQueue(
            FRAME_DURATION, max_queued=settings.max_queued, max_marks=settings.max_marks
        )
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.done = False
        """The link is going away: input is ignored from now on."""
        self.media_ready = False
        self.end_reason: str | None = None
        """The backend sent session.end with this reason."""
        # Lists, not deques: a deque holds a 64-slot block per call, and these queues are
        # short (a frame or two, unless the backend falls behind; capped either way).
        self._events: list[str] = [session_started]
        self._audio: list[bytes] = []
        self._max_audio = max(1, round(settings.caller_buffer / FRAME_DURATION))
        self.writing_since: float | None = None
        """Loop time the write in progress began (see WebSocketBackend._watch_writes)."""
        self._flush_and_stop = False
        self._outgoing = _Wakeup(loop)
        self._wake_player = _Wakeup(loop)
        self._overflowing = False
        self._told_ignored = False
        self._caller = _CallerStream(settings.codec, settings.sample_rate)
        self._encoder: _PcmToOpus | None = (
            _PcmToOpus(settings.sample_rate, settings.opus_bitrate)
            if settings.codec == CODEC_PCM16
            else None
        )
        self._vad: VoiceActivityDetector | None = None
        self._vad_decoder: _OpusToPcm | None = None
        self._vad_timer: asyncio.TimerHandle | None = None
        # (arrival, stream timestamp) of recent caller frames, to place VAD events.
        self._recent: deque[tuple[float, int]] | None = None
        if settings.vad:
            self._recent = deque(maxlen=64)
            self._vad = VoiceActivityDetector(
                threshold_dbfs=settings.vad_threshold_dbfs,
                start_frames=settings.vad_start_frames,
                hangover=settings.vad_hangover,
            )
            if settings.codec == CODEC_OPUS:
                self._vad_decoder = _OpusToPcm(_VAD_SAMPLE_RATE)
        self._writer: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._main = loop.create_task(self._run(), name=f"backend-{call.id}")

    # ------------------------------------------------------------------ caller side

    def caller_audio(self, frame: AudioReceived) -> None:
        if self.done:
            return
        if not self.media_ready:
            self.media_up()
        try:
            frames = self._caller.convert(frame)
        except BackendProtocolError:
            self.counters["caller_frames_invalid"] += 1
            return
        for audio in frames:
            if len(self._audio) >= self._max_audio:
                del self._audio[0]
                self.counters["caller_frames_dropped"] += 1
            self._audio.append(encode_audio_frame(audio, self.settings.sample_rate))
        if self._vad is not None and frames:
            self._detect_voice(frame, frames)
        if frames:
            self._outgoing.set()

    def _detect_voice(self, frame: AudioReceived, frames: list[AudioFrame]) -> None:
        """Feed the VAD; on speech start, barge in: stop playout before the next tick."""
        vad = self._vad
        assert vad is not None
        arrival = frame.arrival
        assert self._recent is not None
        self._recent.append((arrival, frames[-1].timestamp))
        if self._vad_decoder is not None:
            try:
                pcm_frames = [pcm for pcm, _ in self._vad_decoder.decode(frame.payload, 0)]
            except BackendProtocolError:
                self.counters["vad_decode_errors"] += 1
                return
        else:
            pcm_frames = [audio.payload for audio in frames]
        for pcm in pcm_frames:
            vad.process(pcm, arrival)
        self._vad_events()

    def _vad_events(self) -> None:
        vad = self._vad
        assert vad is not None
        while (event := vad.next_event()) is not None:
            timestamp = self._stream_timestamp(event.at)
            if isinstance(event, VadSpeechStarted):
                self.counters["speech_started"] += 1
                self._send_event(encode_event(SpeechStarted(timestamp)))
                if self.settings.barge_in and not self.playout.idle:
                    for name in self.playout.clear():
                        self._send_event(encode_event(MarkCleared(name)))
                    self._overflowing = False
                    self.counters["barge_ins"] += 1
                    self._wake_player.set()
            else:
                self.counters["speech_stopped"] += 1
                self._send_event(encode_event(SpeechStopped(timestamp)))
        if self._vad_timer is not None:
            self._vad_timer.cancel()
            self._vad_timer = None
        due = vad.get_timer()
        if due is not None and not self.done:
            self._vad_timer = self.loop.call_at(due, self._vad_tick)

    def _vad_tick(self) -> None:
        """The caller went quiet without sending frames (DTX): end the turn on time."""
        self._vad_timer = None
        if self._vad is not None and not self.done:
            self._vad.handle_timer(self.loop.time())
            self._vad_events()

    def _stream_timestamp(self, at: float) -> int:
        """The stream timestamp of the caller frame that arrived at or just before ``at``."""
        recent = self._recent or ()
        best = recent[0][1] if recent else 0
        for arrival, timestamp in recent:
            if arrival > at:
                break
            best = timestamp
        return best

    def media_up(self) -> None:
        self.media_ready = True
        self._wake_player.set()

    def call_over(self, reason: str) -> None:
        """The transceiver ended the call: flush, say session.ended, close normally."""
        if self.done:
            return
        self.done = True
        if self._vad_timer is not None:
            self._vad_timer.cancel()
        self._begin_shutdown(
            CloseCode.NORMAL, encode_event(SessionEnded(reason[:1024])), flush=True
        )

    # ------------------------------------------------------------------ failures

    def fail(
        self, reason: str, close_code: int = CloseCode.NORMAL, error: str | None = None
    ) -> None:
        """End this call because of its backend; other calls are untouched."""
        if self.done:
            return
        self.done = True
        self.backend.links.pop(self.call.id, None)
        self.counters[f"calls_failed:{reason.split(':', 1)[0]}"] += 1
        log.warning("ending call: %s", reason, extra={"call": self.call.id})
        self._begin_shutdown(close_code, error, flush=False)
        self.call.close(reason)

    def _protocol_error(self, error: BackendProtocolError) -> None:
        message = str(error)[:1024]
        self.fail(
            f"backend protocol error: {message}",
            error.close_code,
            encode_event(ErrorEvent(error.error_code, message)),
        )

    def _begin_shutdown(self, close_code: int, final_event: str | None, *, flush: bool) -> None:
        if self._player is not None:
            self._player.cancel()
        task = self.loop.create_task(self._shutdown(close_code, final_event, flush))
        self.backend.track(task)

    async def _shutdown(self, close_code: int, final_event: str | None, flush: bool) -> None:
        ws = self.ws
        if ws is None:  # still connecting: nothing to say goodbye to
            self._main.cancel()
            return
        writer = self._writer
        # A stalled backend reads nothing, so waiting for its close handshake is pointless.
        patience = 0.0 if close_code == CloseCode.BACKEND_STALLED else self.settings.close_timeout
        try:
            async with asyncio.timeout(patience):
                if flush and writer is not None and not writer.done():
                    if final_event is not None:
                        self._events.append(final_event)
                    self._flush_and_stop = True
                    self._outgoing.set()
                    await writer
                else:
                    if writer is not None:
                        writer.cancel()
                    if final_event is not None and not ws.closed:
                        await ws.send_str(final_event)
                await ws.close(code=close_code)
        except TimeoutError:
            self.counters["close_timeouts"] += 1
        except (ConnectionError, aiohttp.ClientError):
            pass  # the connection is gone already: nothing left to say
        finally:
            if writer is not None:
                writer.cancel()
            if not ws.closed:
                # Aborts the connection: a cancelled close() drops the transport.
                with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
                    async with asyncio.timeout(0.05):
                        await ws.close(code=close_code)
            self._main.cancel()

    # ------------------------------------------------------------------ tasks

    async def _run(self) -> None:
        """Connect, start the writer and the player, then read until the socket ends."""
        settings = self.settings
        headers = {**settings.headers, "X-Voxrelay-Call-Id": self.call.id}
        ws_timeout = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=settings.close_timeout)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                ws = await self.backend.client().ws_connect(
                    settings.url,
                    protocols=(SUBPROTOCOL,),
                    headers=headers,
                    heartbeat=settings.heartbeat,
                    max_msg_size=MAX_MESSAGE_BYTES,
                    compress=0,
                    timeout=ws_timeout,
                )
        except TimeoutError:
            self.fail(f"backend unavailable: no WebSocket within {settings.connect_timeout:g} s")
            return
        except aiohttp.WSServerHandshakeError as error:
            self.fail(f"backend unavailable: handshake answered HTTP {error.status}")
            return
        except (aiohttp.ClientError, OSError) as error:
            self.fail(f"backend unavailable: {error}")
            return
        if self.done:  # the call ended while we connected
            await ws.close()
            return
        self.ws = ws
        self.counters["calls_connected"] += 1
        self._writer = self.loop.create_task(self._write(ws))
        self._player = self.loop.create_task(self._play())
        await self._read(ws)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await ws.receive()
            if self.done:
                return
            kind = message.type
            if kind is aiohttp.WSMsgType.BINARY:
                self._backend_audio(message.data)
            elif kind is aiohttp.WSMsgType.TEXT:
                self._backend_event(message.data)
            elif kind is aiohttp.WSMsgType.ERROR:
                self._socket_error(message.data)
                return
            else:  # CLOSE, CLOSING, CLOSED
                self._disconnected(f"close code {ws.close_code}")
                return

    def _socket_error(self, error: object) -> None:
        code = getattr(error, "code", None)
        if code == CloseCode.MESSAGE_TOO_BIG:
            self.fail(
                f"backend protocol error: message larger than {MAX_MESSAGE_BYTES} bytes",
                CloseCode.MESSAGE_TOO_BIG,
            )
        elif code is not None:
            self.fail(f"backend protocol error: {error}", code)
        else:
            self._disconnected(str(error) or type(error).__name__)

    def _disconnected(self, detail: str) -> None:
        if self.end_reason is not None:
            # session.end came first: the queued audio still plays, then the call ends.
            self._wake_player.set()
            return
        self.fail(f"backend disconnected: {detail}")

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send events first, then caller audio; a write stuck for write_timeout is fatal
        (the backend's watchdog calls :meth:`write_stalled`)."""
        events, audio, clock = self._events, self._audio, self.loop.time
        try:
            while True:
                if events:
                    self.writing_since = clock()
                    await ws.send_str(events.pop(0))
                elif audio:
                    self.writing_since = clock()
                    await ws.send_bytes(audio.pop(0))
                    self.counters["caller_frames_sent"] += 1
                elif self._flush_and_stop:
                    return
                else:
                    self.writing_since = None
                    self._outgoing.clear()
                    await self._outgoing.wait()
        except (ConnectionError, aiohttp.ClientError):
            pass  # the reader reports the lost connection
        finally:
            self.writing_since = None

    def write_stalled(self) -> None:
        timeout = self.settings.write_timeout
        self.fail(
            f"backend stalled: a write waited {timeout:g} s (the backend is not reading)",
            CloseCode.BACKEND_STALLED,
        )

    def _send_event(self, text: str) -> None:
        if self.done and not self._flush_and_stop:
            return
        if len(self._events) >= self.settings.max_pending_events:
            self.fail(
                f"backend stalled: {len(self._events)} events unread",
                CloseCode.BACKEND_STALLED,
            )
            return
        self._events.append(text)
        self._outgoing.set()

    async def _play(self) -> None:
        """Hand the call one frame per 20 ms tick while there is audio to play."""
        loop, playout, call = self.loop, self.playout, self.call
        wake = self._wake_player
        while True:
            deadline = playout.next_deadline() if self.media_ready else None
            if deadline is None:
                if self.end_reason is not None and (playout.idle or not self.media_ready):
                    self._end_by_backend()
                    return
                wake.clear()
                await wake.wait()
                continue
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for event in playout.poll(loop.time()):
                if isinstance(event, FrameDue):
                    try:
                        sent = call.send_audio(event.payload, SAMPLES_PER_FRAME)
                    except Exception as error:  # the transceiver's fault, but this call's end
                        log.exception("sending backend audio failed", extra={"call": call.id})
                        self.fail(f"backend error: sending audio failed: {error}")
                        return
                    self.counters[
                        "backend_frames_played" if sent else "backend_frames_not_sent"
                    ] += 1
                else:
                    self._send_event(encode_event(MarkPlayed(event.name)))

    def _end_by_backend(self) -> None:
        reason = f"backend ended the session: {self.end_reason}"
        self.counters["calls_ended_by_backend"] += 1
        self.call.close(reason)  # the transceiver calls call_ended, which says goodbye

    # ------------------------------------------------------------------ backend side

    def _backend_event(self, text: str) -> None:
        try:
            event = parse_backend_event(text)
        except BackendProtocolError as error:
            self._protocol_error(error)
            return
        if isinstance(event, AudioClear):
            for name in self.playout.clear():
                self._send_event(encode_event(MarkCleared(name)))
            self._overflowing = False
            self.counters["backend_clears"] += 1
            self._wake_player.set()
        elif isinstance(event, Mark):
            if self.end_reason is not None:
                self._ignored_after_end("mark")
            elif not self.playout.mark(event.name):
                self._send_event(
                    encode_event(
                        ErrorEvent(
                            ErrorCode.TOO_MANY_MARKS,
                            f"mark {event.name[:64]!r} dropped: "
                            f"{self.settings.max_marks} marks already pending",
                        )
                    )
                )
            else:
                self._wake_player.set()
        elif isinstance(event, SessionEnd):
            if self.end_reason is None:
                self.end_reason = event.reason
                self._wake_player.set()
        else:
            self.counters["backend_error_events"] += 1
            log.warning(
                "backend reported %s: %s",
                event.code,
                event.message[:200],
                extra={"call": self.call.id},
            )

    def _backend_audio(self, data: bytes) -> None:
        settings = self.settings
        try:
            frame = decode_audio_frame(data, codec=settings.codec, sample_rate=settings.sample_rate)
        except BackendProtocolError as error:
            self._protocol_error(error)
            return
        if self.end_reason is not None:
            self._ignored_after_end("audio")
            return
        self.counters["backend_frames_received"] += 1
        if self._encoder is None:
            packets = [frame.payload]
        else:
            try:
                packets = self._encoder.encode(frame.payload)
            except Exception as error:  # OpusError, or a bug: none may escape here
                log.exception("Opus encoder failed", extra={"call": self.call.id})
                message = f"Opus encoder failed: {error}"[:1024]
                self.fail(
                    f"backend error: {message}",
                    CloseCode.INTERNAL_ERROR,
                    encode_event(ErrorEvent(ErrorCode.INTERNAL_ERROR, message)),
                )
                return
        playout = self.playout
        for packet in packets:
            if playout.enqueue(packet):
                # Report overflow again only once the queue has drained to half.
                if self._overflowing and playout.queued_frames <= playout.max_frames // 2:
                    self._overflowing = False
                continue
            self.counters["backend_frames_overflowed"] += 1
            if not self._overflowing:
                self._overflowing = True
                self._send_event(
                    encode_event(
                        ErrorEvent(
                            ErrorCode.AUDIO_QUEUE_FULL,
                            f"playout queue holds {settings.max_queued:g} s; audio dropped "
                            "until it drains",
                        )
                    )
                )
        self._wake_player.set()

    def _ignored_after_end(self, what: str) -> None:
        self.counters["backend_ignored_after_end"] += 1
        if self._told_ignored:
            return
        self._told_ignored = True
        self._send_event(
            encode_event(
                ErrorEvent(
                    ErrorCode.IGNORED_AFTER_END, f"{what} after session.end ignored (told once)"
                )
            )
        )


class _Wakeup:
    """An ``asyncio.Event`` for a single waiter (a call's writer or player task).

    ``asyncio.Event`` keeps a deque of waiters, a 64-slot block per event, and looks up the
    running loop (a ``getpid()`` system call) on every wait; these wake once per frame.
    """

    __slots__ = ("_is_set", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        if self._is_set:
            return
        self._is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        assert self._waiter is None, "a _Wakeup has one waiter"
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class _CallerStream:
    """Turns the caller's RTP audio into the protocol's 20 ms frames with timestamps."""

    def __init__(self, codec: str, sample_rate: int) -> None:
        self.codec = codec
        self.sample_rate = sample_rate
        self._ssrc: int | None = None
        self._offset = 0
        """Added to the RTP timestamp (mod 2**32) to give the stream timestamp."""
        self._next: int | None = None
        """The stream timestamp the next frame should carry (opus) or decode at (pcm16)."""
        self._decoder = _OpusToPcm(sample_rate) if codec == CODEC_PCM16 else None

    def convert(self, frame: AudioReceived) -> list[AudioFrame]:
        samples = opus_packet_samples(frame.payload)
        if frame.ssrc != self._ssrc:
            # A new RTP stream (or the first): continue where the last one ended.
            self._offset = ((self._next or 0) - frame.timestamp) & 0xFFFFFFFF
            self._ssrc = frame.ssrc
        timestamp = (frame.timestamp + self._offset) & 0xFFFFFFFF
        if self._decoder is None:
            if samples != SAMPLES_PER_FRAME:
                raise BackendProtocolError("caller Opus packet is not 20 ms")
            self._next = (timestamp + samples) & 0xFFFFFFFF
            return [AudioFrame(CODEC_OPUS, timestamp, frame.payload, frame.marker)]
        gap = 0
        if self._next is not None:
            gap = (timestamp - self._next) & 0xFFFFFFFF
            if gap >= 0x80000000:
                return []  # late or duplicate packet: its moment has passed
        self._next = (timestamp + samples) & 0xFFFFFFFF
        pcm_frames = self._decoder.decode(frame.payload, min(gap, _MAX_SILENCE_FILL))
        return [AudioFrame(CODEC_PCM16, ts, pcm) for pcm, ts in pcm_frames]


class _OpusToPcm:
    """Opus -> 20 ms frames of mono int16 PCM at the session rate (libopus decodes straight
    to it)."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.frame_bytes = pcm16_frame_bytes(sample_rate)
        self._decoder = OpusDecoder(sample_rate)
        self._pending = bytearray()
        self._timestamp = 0

    def decode(self, packet: bytes, silence_48k: int) -> list[tuple[bytes, int]]:
        """Decode one packet after ``silence_48k`` missing samples; return whole frames."""
        try:
            pcm = self._decoder.decode(packet)
        except OpusError as error:
            raise BackendProtocolError(f"caller Opus packet does not decode: {error}") from None
        size = self.frame_bytes
        pending = self._pending
        if silence_48k:
            pending += bytes(silence_48k * self.sample_rate // OPUS_SAMPLE_RATE * 2)
        if not pending and len(pcm) == size:  # the usual case: one 20 ms packet, one frame
            frame = (pcm, self._timestamp)
            self._timestamp = (self._timestamp + size // 2) & 0xFFFFFFFF
            return [frame]
        pending += pcm
        frames: list[tuple[bytes, int]] = []
        while len(pending) >= size:
            frames.append((bytes(pending[:size]), self._timestamp))
            del pending[:size]
            self._timestamp = (self._timestamp + size // 2) & 0xFFFFFFFF
        return frames


class _PcmToOpus:
    """20 ms frames of mono int16 PCM at the session rate -> Opus packets (libopus)."""

    def __init__(self, sample_rate: int, bitrate: int) -> None:
        self._encoder = OpusEncoder(sample_rate, bitrate)

    def encode(self, pcm: bytes) -> list[bytes]:
        return [self._encoder.encode(pcm)]
