"""WebSocketBackend against real aiohttp WebSocket backends on loopback.

The backends here are real servers speaking the wire protocol (an echo, a burst player,
garbage, a hang-up, one that never reads); the call is a recording stand-in for the
transceiver's CallHandle (our own interface, not the network), which does what the
transceiver does: ``close`` calls ``call_ended`` at once. Each backend script is picked
by the call id's prefix, which reaches the server in the X-Voxrelay-Call-Id header, so
several calls with different backends share one WebSocketBackend, as in production.
Timing checks are loose (counts over windows, ordering), since the machine is noisy.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import pytest
from aiohttp import WSMsgType, web

from voxrelay.engine.backend_client import WebSocketBackend, WebSocketBackendSettings
from voxrelay.proto.backend_wire import (
    SUBPROTOCOL,
    AudioClear,
    AudioFrame,
    ErrorEvent,
    Mark,
    MarkCleared,
    MarkPlayed,
    SessionEnd,
    SessionEnded,
    SessionStarted,
    decode_audio_frame,
    encode_audio_frame,
    encode_event,
    opus_packet_samples,
    parse_transceiver_event,
)
from voxrelay.proto.session import AudioReceived

pytestmark = pytest.mark.timeout(60)


def opus_frame(tag: int, size: int = 3) -> bytes:
    """A 20 ms CELT fullband Opus packet whose bytes say which frame it is."""
    return bytes([0xF8]) + tag.to_bytes(max(size - 1, 2), "big")


def tag_of(packet: bytes) -> int:
    return int.from_bytes(packet[1:], "big")


# ------------------------------------------------------------------------ the backend service


@dataclass
class Session:
    """What one call's backend saw."""

    call_id: str
    started: SessionStarted | None = None
    events: list[tuple[float, object]] = field(default_factory=list)
    frames: list[AudioFrame] = field(default_factory=list)
    close_code: int | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    service_stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def names(self, kind: type) -> list[str]:
        return [event.name for _, event in self.events if isinstance(event, kind)]  # type: ignore[attr-defined]


Script = Callable[[web.WebSocketResponse, Session], Awaitable[None]]


class BackendService:
    """An aiohttp WebSocket server; each call runs the script its call id names."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.sessions: dict[str, Session] = {}
        self.stop = asyncio.Event()
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A small receive buffer, so a backend that stops reading pushes back quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self.runner, sock)
        await site.start()
        self.url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"

    def session(self, call_id: str) -> Session:
        """The call's session, or an empty one while its connection has not arrived."""
        return self.sessions.get(call_id) or Session(call_id)

    async def close(self) -> None:
        self.stop.set()
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        call_id = request.headers["X-Voxrelay-Call-Id"]
        session = self.sessions[call_id] = Session(call_id, service_stopping=self.stop)
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=1 << 20)
        await ws.prepare(request)
        try:
            await self.scripts[call_id.split("-")[0]](ws, session)
        finally:
            session.close_code = ws.close_code
            session.finished.set()
        return ws


async def receive_started(ws: web.WebSocketResponse, session: Session) -> SessionStarted:
    message = await ws.receive()
    started = parse_transceiver_event(message.data)
    assert isinstance(started, SessionStarted)
    session.started = started
    return started


async def read_until_closed(ws: web.WebSocketResponse, session: Session, echo: bool = False):
    """Record every event and frame until the transceiver closes; echo audio if asked."""
    assert session.started is not None
    loop = asyncio.get_running_loop()
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            session.events.append((loop.time(), parse_transceiver_event(message.data)))
        elif message.type is WSMsgType.BINARY:
            frame = decode_audio_frame(
                message.data, codec=session.started.codec, sample_rate=session.started.sample_rate
            )
            session.frames.append(frame)
            if echo:
                await ws.send_bytes(message.data)


def backend_frame(session: Session, payload: bytes, timestamp: int = 0) -> bytes:
    assert session.started is not None
    frame = AudioFrame(session.started.codec, timestamp, payload)
    return encode_audio_frame(frame, session.started.sample_rate)


async def echo(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    await read_until_closed(ws, session, echo=True)


# ------------------------------------------------------------------------ the call


class RecordingCall:
    """The transceiver's side of one call: records what it is asked to send, and ends like
    CallHandle does (close ends the call, and the backend hears call_ended at once)."""

    def __init__(self, backend: WebSocketBackend, call_id: str) -> None:
        self.backend = backend
        self.id = call_id
        self.sent: list[tuple[float, bytes]] = []
        self.reasons: list[str] = []
        self.ended = asyncio.Event()
        self._sequence = itertools.count()

    def send_audio(self, payload: bytes, samples: int = 960) -> bool:
        if self.reasons:
            return False
        assert samples == 960
        self.sent.append((asyncio.get_running_loop().time(), payload))
        return True

    def close(self, reason: str) -> None:
        if self.reasons:
            return
        self.reasons.append(reason)
        self.ended.set()
        self.backend.call_ended(self, reason)

    def hear(self, payload: bytes, timestamp: int, marker: bool = False) -> None:
        """The caller sent one RTP packet."""
        frame = AudioReceived(payload, 111, next(self._sequence), timestamp, 0x1234, marker, 0.0)
        self.backend.audio_received(self, frame)

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.sent]


async def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def with_backend(
    scenario: Callable[[BackendService, WebSocketBackend], Awaitable[None]],
    scripts: dict[str, Script],
    **settings: object,
) -> None:
    service = BackendService()
    service.scripts.update(scripts)
    await service.start()
    backend = WebSocketBackend(
        WebSocketBackendSettings(url=service.url, **{"heartbeat": 30.0, **settings})  # type: ignore[arg-type]
    )
    try:
        await scenario(service, backend)
    finally:
        await backend.close()
        await service.close()


def start_call(backend: WebSocketBackend, call_id: str) -> RecordingCall:
    call = RecordingCall(backend, call_id)
    backend.call_started(call)
    return call


# ------------------------------------------------------------------------ tests


def test_echo_over_the_wire_with_opus_passthrough() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "echo-1")
        await eventually(lambda: "echo-1" in service.sessions)
        for index in range(10):
            call.hear(opus_frame(index), 5000 + index * 960, marker=index == 0)
            await asyncio.sleep(0.02)
        await eventually(lambda: len(call.sent) == 10)
        assert [tag_of(payload) for payload in call.payloads] == list(range(10))
        session = service.sessions["echo-1"]
        assert session.started == SessionStarted(
            call_id="echo-1", codec="opus", sample_rate=48000, max_queued_ms=30000, metadata={}
        )
        assert [frame.timestamp for frame in session.frames] == [i * 960 for i in range(10)]
        assert [frame.marker for frame in session.frames] == [True] + [False] * 9
        call.close("ended by client (DELETE)")
        await asyncio.wait_for(session.finished.wait(), 5)
        assert session.events[-1][1] == SessionEnded("ended by client (DELETE)")
        assert session.close_code == 1000
        assert backend.counters["calls_connected"] == 1
        assert backend.active_calls == 0

    asyncio.run(with_backend(scenario, {"echo": echo}))


def test_caller_metadata_reaches_the_backend_and_a_broken_hook_ends_only_its_call() -> None:
    def metadata(call: RecordingCall) -> dict:
        if call.id == "echo-broken":
            raise KeyError("tenant")
        return {"tenant": "acme", "priority": 2}

    async def scenario() -> None:
        service = BackendService()
        service.scripts["echo"] = echo
        await service.start()
        backend = WebSocketBackend(WebSocketBackendSettings(url=service.url), metadata=metadata)
        try:
            good = start_call(backend, "echo-good")
            broken = start_call(backend, "echo-broken")
            await asyncio.wait_for(broken.ended.wait(), 5)
            assert broken.reasons == ["backend error: 'tenant'"]
            await eventually(lambda: service.session("echo-good").started is not None)
            started = service.sessions["echo-good"].started
            assert started is not None and started.metadata == {"tenant": "acme", "priority": 2}
            assert good.reasons == []
        finally:
            await backend.close()
            await service.close()

    asyncio.run(scenario())


async def burst(ws: web.WebSocketResponse, session: Session) -> None:
    """Fifty frames (one second) at once, with marks after frames 0, 25 and 50."""
    await receive_started(ws, session)
    await ws.send_str(encode_event(Mark("start")))
    for index in range(50):
        await ws.send_bytes(backend_frame(session, opus_frame(index), index * 960))
        if index == 24:
            await ws.send_str(encode_event(Mark("half")))
    await ws.send_str(encode_event(Mark("end")))
    await read_until_closed(ws, session)


def test_a_burst_is_paced_one_frame_per_20ms_and_marks_fire_in_order() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "burst-1")
        backend.call_connected(call)
        await eventually(lambda: "end" in service.session("burst-1").names(
            MarkPlayed), timeout=10)  # fmt: skip
        session = service.sessions["burst-1"]
        assert [tag_of(payload) for payload in call.payloads] == list(range(50))
        assert session.names(MarkPlayed) == ["start", "half", "end"]
        times = [at for at, _ in call.sent]
        # 49 ticks separate the first frame from the last: 0.98 s, not a millisecond burst.
        assert 0.9 < times[-1] - times[0] < 5.0
        # No window of ten frames is squeezed much below 200 ms (a late tick may catch up).
        assert min(b - a for a, b in zip(times, times[10:])) > 0.1  # noqa: B905
        marks_at = {event.name: at for at, event in session.events if isinstance(event, MarkPlayed)}
        assert marks_at["half"] >= times[24]
        assert marks_at["end"] >= times[49]
        assert backend.counters["backend_frames_played"] == 50

    asyncio.run(with_backend(scenario, {"burst": burst}))


def test_playout_waits_for_the_callers_media() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "burst-2")
        await eventually(lambda: "burst-2" in service.sessions)
        await asyncio.sleep(0.2)
        assert call.sent == []  # the call is not connected yet: audio would be lost
        call.hear(opus_frame(0), 0)  # the caller's first packet: media is up
        await eventually(lambda: len(call.sent) >= 5)

    asyncio.run(with_backend(scenario, {"burst": burst}))


async def barge_in(ws: web.WebSocketResponse, session: Session) -> None:
    """Two seconds of speech, cut off by audio.clear once five frames have played."""
    await receive_started(ws, session)
    for index in range(100):
        await ws.send_bytes(backend_frame(session, opus_frame(index)))
        if index == 4:
            await ws.send_str(encode_event(Mark("five")))
    await ws.send_str(encode_event(Mark("never")))
    async for message in ws:
        event = parse_transceiver_event(message.data)
        session.events.append((asyncio.get_running_loop().time(), event))
        if event == MarkPlayed("five"):
            await ws.send_str(encode_event(AudioClear()))
            for index in range(3):
                await ws.send_bytes(backend_frame(session, opus_frame(1000 + index)))
            await ws.send_str(encode_event(Mark("answer")))


def test_clear_cuts_queued_audio_within_a_frame_and_reports_dropped_marks() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "bargein-1")
        backend.call_connected(call)
        await eventually(lambda: "answer" in service.session("bargein-1").names(MarkPlayed))
        session = service.sessions["bargein-1"]
        tags = [tag_of(payload) for payload in call.payloads]
        old = [tag for tag in tags if tag < 1000]
        assert old == list(range(len(old)))
        # The old audio stops right where the clear landed: frames 0-4 before the mark, at
        # most a few more while mark.played and audio.clear crossed the loopback.
        assert 5 <= len(old) <= 9
        assert tags[len(old) :] == [1000, 1001, 1002]  # the next frame heard is the new audio
        assert session.names(MarkCleared) == ["never"]
        assert session.names(MarkPlayed) == ["five", "answer"]
        assert backend.counters["backend_clears"] == 1

    asyncio.run(with_backend(scenario, {"bargein": barge_in}))


async def garbage_text(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    await ws.send_str("hello, I am not JSON")
    await read_until_closed(ws, session)


async def garbage_audio(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    await ws.send_bytes(b"\x99" * 20)
    await read_until_closed(ws, session)


async def oversize(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    await ws.send_str("x" * 70_000)
    await read_until_closed(ws, session)


async def hang_up(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    await ws.close(code=1001)


async def vanish(ws: web.WebSocketResponse, session: Session) -> None:
    await receive_started(ws, session)
    ws._req.transport.abort()  # type: ignore[union-attr]  # the TCP connection just dies


def test_failures_end_only_the_affected_call_with_a_clear_reason() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        healthy = start_call(backend, "echo-healthy")
        broken = {
            name: start_call(backend, f"{name}-1")
            for name in ("garbagetext", "garbageaudio", "oversize", "hangup", "vanish")
        }
        for call in broken.values():
            await asyncio.wait_for(call.ended.wait(), 5)
        expected = {
            "garbagetext": "backend protocol error: event is not valid JSON",
            "garbageaudio": "backend protocol error: audio frame version 9",
            "oversize": "backend protocol error: message larger than 65536 bytes",
            "hangup": "backend disconnected: close code 1001",
            "vanish": "backend disconnected",
        }
        for name, call in broken.items():
            assert len(call.reasons) == 1
            assert call.reasons[0].startswith(expected[name]), call.reasons
        for name, code in (("garbagetext", 1002), ("garbageaudio", 1002), ("oversize", 1009)):
            session = service.sessions[f"{name}-1"]
            await asyncio.wait_for(session.finished.wait(), 5)
            assert session.close_code == code
        errors = [
            e for _, e in service.sessions["garbagetext-1"].events if isinstance(e, ErrorEvent)
        ]
        assert [error.code for error in errors] == ["invalid_event"]
        errors = [
            e for _, e in service.sessions["garbageaudio-1"].events if isinstance(e, ErrorEvent)
        ]
        assert [error.code for error in errors] == ["invalid_audio"]
        # The healthy call never noticed.
        for index in range(5):
            healthy.hear(opus_frame(index), index * 960)
            await asyncio.sleep(0.02)
        await eventually(lambda: len(healthy.sent) == 5)
        assert healthy.reasons == []
        assert backend.active_calls == 1
        assert backend.counters["calls_failed:backend protocol error"] == 3
        assert backend.counters["calls_failed:backend disconnected"] == 2

    scripts = {
        "echo": echo,
        "garbagetext": garbage_text,
        "garbageaudio": garbage_audio,
        "oversize": oversize,
        "hangup": hang_up,
        "vanish": vanish,
    }
    asyncio.run(with_backend(scenario, scripts))


def test_a_backend_that_stops_reading_costs_only_its_own_call() -> None:
    async def never_reads(ws: web.WebSocketResponse, session: Session) -> None:
        await asyncio.wait_for(session.service_stopping.wait(), 30)

    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        stuck = start_call(backend, "neverreads-1")
        healthy = start_call(backend, "echo-2")
        await eventually(lambda: {"neverreads-1", "echo-2"} <= service.sessions.keys())
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        index = 0
        while not stuck.ended.is_set() and loop.time() - sent_at < 10:
            for _ in range(50):  # big caller frames, far faster than real time
                stuck.hear(opus_frame(index, size=1400), index * 960)
                index += 1
            healthy.hear(opus_frame(index), index * 960)
            await asyncio.sleep(0.01)
        assert stuck.reasons and stuck.reasons[0].startswith("backend stalled"), stuck.reasons
        assert backend.counters["caller_frames_dropped"] > 0
        # The other call kept flowing all along, and still does.
        assert len(healthy.sent) > 10
        before = len(healthy.sent)
        healthy.hear(opus_frame(1), 0)
        await eventually(lambda: len(healthy.sent) > before)
        assert healthy.reasons == []

    scripts = {"neverreads": never_reads, "echo": echo}
    asyncio.run(with_backend(scenario, scripts, write_timeout=0.5))


def test_session_end_plays_the_queued_audio_then_ends_the_call() -> None:
    async def goodbye(ws: web.WebSocketResponse, session: Session) -> None:
        await receive_started(ws, session)
        for index in range(10):
            await ws.send_bytes(backend_frame(session, opus_frame(index)))
        await ws.send_str(encode_event(Mark("bye-said")))
        await ws.send_str(encode_event(SessionEnd("task complete")))
        await ws.send_bytes(backend_frame(session, opus_frame(99)))  # too late: ignored
        await read_until_closed(ws, session)

    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "goodbye-1")
        backend.call_connected(call)
        await asyncio.wait_for(call.ended.wait(), 5)
        assert call.reasons == ["backend ended the session: task complete"]
        assert [tag_of(payload) for payload in call.payloads] == list(range(10))
        session = service.sessions["goodbye-1"]
        await asyncio.wait_for(session.finished.wait(), 5)
        events = [event for _, event in session.events]
        assert MarkPlayed("bye-said") in events
        assert events[-1] == SessionEnded("backend ended the session: task complete")
        assert any(isinstance(e, ErrorEvent) and e.code == "ignored_after_end" for e in events)
        assert session.close_code == 1000

    asyncio.run(with_backend(scenario, {"goodbye": goodbye}))


def test_audio_beyond_the_queue_bound_is_dropped_and_reported_once() -> None:
    async def flood(ws: web.WebSocketResponse, session: Session) -> None:
        await receive_started(ws, session)
        for index in range(40):
            await ws.send_bytes(backend_frame(session, opus_frame(index)))
        await ws.send_str(encode_event(Mark("flood-end")))
        await read_until_closed(ws, session)

    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "flood-1")
        backend.call_connected(call)
        await eventually(lambda: "flood-end" in service.session("flood-1").names(MarkPlayed))
        session = service.sessions["flood-1"]
        assert session.started is not None and session.started.max_queued_ms == 200
        played = [tag_of(payload) for payload in call.payloads]
        # What was queued plays in order; what arrived while the queue was full is gone.
        assert played[:10] == list(range(10))
        assert played == sorted(played)
        assert 10 <= len(played) < 40
        errors = [e for _, e in session.events if isinstance(e, ErrorEvent)]
        assert [error.code for error in errors] == ["audio_queue_full"]
        assert backend.counters["backend_frames_overflowed"] == 40 - len(played)

    asyncio.run(with_backend(scenario, {"flood": flood}, max_queued=0.2))


def test_unreachable_backends_end_the_call_as_unavailable() -> None:
    async def scenario() -> None:
        service = BackendService()
        await service.start()
        with socket.socket() as closed_port:
            closed_port.bind(("127.0.0.1", 0))
            port = closed_port.getsockname()[1]
        wrong_path = service.url.replace("/ws", "/nowhere")
        urls = {
            f"ws://127.0.0.1:{port}/ws": "backend unavailable: ",
            wrong_path: "backend unavailable: handshake answered HTTP 404",
        }
        try:
            for url, reason in urls.items():
                backend = WebSocketBackend(WebSocketBackendSettings(url=url))
                call = start_call(backend, "x-1")
                call.hear(opus_frame(0), 0)  # caller audio meanwhile is simply dropped
                await asyncio.wait_for(call.ended.wait(), 5)
                assert call.reasons[0].startswith(reason), call.reasons
                assert backend.counters["calls_failed:backend unavailable"] == 1
                await backend.close()
        finally:
            await service.close()

    asyncio.run(scenario())


def test_a_backend_that_answers_no_pings_is_disconnected() -> None:
    async def deaf(ws: web.WebSocketResponse, session: Session) -> None:
        await asyncio.wait_for(session.service_stopping.wait(), 30)  # reads nothing, ever

    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "deaf-1")
        await asyncio.wait_for(call.ended.wait(), 5)
        assert call.reasons[0].startswith("backend disconnected"), call.reasons

    asyncio.run(with_backend(scenario, {"deaf": deaf}, heartbeat=0.2))


def test_a_backend_that_never_answers_the_handshake_times_out() -> None:
    async def scenario() -> None:
        with socket.socket() as silent:  # accepts TCP (backlog) but never speaks HTTP
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            url = f"ws://127.0.0.1:{silent.getsockname()[1]}/ws"
            backend = WebSocketBackend(WebSocketBackendSettings(url=url, connect_timeout=0.3))
            call = start_call(backend, "slow-1")
            await asyncio.wait_for(call.ended.wait(), 5)
            assert call.reasons == ["backend unavailable: no WebSocket within 0.3 s"]
            # A call that ends while its backend is still connecting just goes away.
            other = start_call(backend, "slow-2")
            await asyncio.sleep(0.05)
            other.close("ended by client (DELETE)")
            await backend.close()
            assert other.reasons == ["ended by client (DELETE)"]
            assert backend.active_calls == 0
            assert backend.counters["calls_failed:backend unavailable"] == 1

    asyncio.run(scenario())


def sine_opus_packets(count: int) -> list[bytes]:
    """Real caller audio: a 440 Hz tone, libopus at 48 kHz, 20 ms packets."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48000
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.time_base = Fraction(1, 48000)
    encoder.open()
    packets: list[bytes] = []
    for index in range(count):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        samples = bytearray()
        for n in range(index * 960, (index + 1) * 960):
            value = int(8000 * ((n * 440 * 2 // 48000) % 2 * 2 - 1))  # a square-ish wave
            samples += value.to_bytes(2, "little", signed=True)
        frame.planes[0].update(bytes(samples))
        frame.sample_rate = 48000
        frame.pts = index * 960
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    return packets


def test_pcm16_backends_get_20ms_pcm_and_their_pcm_goes_out_as_opus() -> None:
    async def scenario(service: BackendService, backend: WebSocketBackend) -> None:
        call = start_call(backend, "echo-pcm")
        await eventually(lambda: "echo-pcm" in service.sessions)
        packets = sine_opus_packets(12)
        for index, packet in enumerate(packets):
            if index == 5:
                continue  # lost on the way: the backend hears 20 ms of silence instead
            call.hear(packet, 90000 + index * 960)
            await asyncio.sleep(0.01)
        session = service.sessions["echo-pcm"]
        await eventually(lambda: len(session.frames) >= 11)
        started = session.started
        assert started is not None
        assert (started.codec, started.sample_rate) == ("pcm16", 16000)
        timestamps = [frame.timestamp for frame in session.frames]
        assert timestamps == [index * 320 for index in range(len(timestamps))]
        assert all(len(frame.payload) == 640 for frame in session.frames)
        loud = [max(abs(int.from_bytes(f.payload[i : i + 2], "little", signed=True))
                    for i in range(0, 640, 2)) for f in session.frames[2:]]  # fmt: skip
        assert max(loud) > 2000  # the tone came through the decoder
        await eventually(lambda: len(call.sent) >= 10)
        for payload in call.payloads:  # the echo went back as 20 ms Opus packets
            assert opus_packet_samples(payload) == 960
        decoder = av.CodecContext.create("opus", "r")
        decoded = [f for p in call.payloads for f in decoder.decode(av.Packet(p))]
        assert sum(f.samples for f in decoded) == 960 * len(call.payloads)

    asyncio.run(with_backend(scenario, {"echo": echo}, codec="pcm16", sample_rate=16000))


def test_settings_refuse_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(ValueError, match="sample_rate must be one of"):
        WebSocketBackendSettings(url="ws://x/", codec="pcm16", sample_rate=44100)
    with pytest.raises(ValueError, match="codec opus runs at 48000"):
        WebSocketBackendSettings(url="ws://x/", sample_rate=16000)
    with pytest.raises(ValueError, match="must start with ws:// or wss://"):
        WebSocketBackendSettings(url="http://x/")
    with pytest.raises(ValueError, match="codec must be 'opus' or 'pcm16'"):
        WebSocketBackendSettings(url="ws://x/", codec="g711")
