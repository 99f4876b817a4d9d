"""The voice agent behind the whole fleet: turn end, answer, barge-in, marks, backend failure.

Everything is real: `voxrelay up` (relay workers, transceiver with VAD and barge-in), the
example agent as its own process (`voxrelay backend agent`), and aiortc callers sending
speech-like audio (a voiced tone with syllable-rate modulation) through the relay.
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import json
import math
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import ClientSession, web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc_caller import whip_call
from av import AudioFrame
from localfleet import LocalFleet

pytestmark = pytest.mark.timeout(180)

RATE = 48_000
SAMPLES = 960


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _speech(start_sample: int) -> np.ndarray:
    """20 ms of a voiced sound: 140 Hz with harmonics, 4 Hz syllable envelope."""
    t = (np.arange(SAMPLES) + start_sample) / RATE
    voice = sum(np.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * math.pi * 4 * t)
    return 0.25 * voice * envelope


@dataclass
class Script:
    """What the caller says when; the barge-in starts once the agent has talked a while."""

    turn_seconds: float = 1.2
    barge_after_agent: float = 0.5
    barge_seconds: float = 0.8
    started: float | None = None
    turn_end: float | None = None
    first_agent_packet: float | None = None
    barge_start: float | None = None
    barge_end: float | None = None
    arrivals: list[float] = field(default_factory=list)


class ScriptedVoice(MediaStreamTrack):
    kind = "audio"

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.samples = 0

    async def recv(self) -> AudioFrame:
        script = self.script
        now = time.monotonic()
        if script.started is None:
            script.started = now
        due = script.started + self.samples / RATE
        if due > now:
            await asyncio.sleep(due - now)
        now = time.monotonic()
        elapsed = self.samples / RATE
        speaking = 0.2 <= elapsed < 0.2 + script.turn_seconds
        if not speaking and script.turn_end is None and elapsed >= 0.2 + script.turn_seconds:
            script.turn_end = now
        if (
            script.first_agent_packet is not None
            and script.barge_start is None
            and now >= script.first_agent_packet + script.barge_after_agent
        ):
            script.barge_start = now  # this frame is the first of the barge-in
        if script.barge_start is not None and script.barge_end is None:
            if now < script.barge_start + script.barge_seconds:
                speaking = True
            else:
                script.barge_end = now
        pcm = _speech(self.samples) if speaking else np.zeros(SAMPLES)
        pcm = pcm + np.random.default_rng(self.samples).normal(0, 0.0005, SAMPLES)
        frame = AudioFrame.from_ndarray(
            (pcm * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        frame.pts = self.samples
        frame.time_base = fractions.Fraction(1, RATE)
        self.samples += SAMPLES
        return frame


def _tap_arrivals(pc: RTCPeerConnection, arrivals: list[float], on_first) -> None:
    """Stamp every RTP packet from the agent as SRTP delivers it (before any jitter buffer)."""
    transport = pc.getTransceivers()[0].receiver.transport
    original = transport._handle_rtp_data

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        now = time.monotonic()
        if not arrivals:
            on_first(now)
        arrivals.append(now)
        await original(data, arrival_time_ms)

    transport._handle_rtp_data = handle


def _wait_for_listener(port: int, timeout: float = 15.0) -> None:
    """Until a TCP connect to 127.0.0.1:``port`` succeeds (the backend listens), or
    ``timeout``; what follows fails plainly if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


AGENT_FLEET = """
[fleet]
name = "{name}"
cluster_id = 9
runtime_dir = "{runtime_dir}"
log_format = "text"
[secrets]
token_secrets = ["hex:{secret}"]
[relay]
bind = "127.0.0.1"
port = 0
workers = 1
drain_seconds = 0
[metrics]
port = 0
[transceiver]
count = 1
signaling_port = 0
[backend]
kind = "websocket"
url = "BACKEND_URL"
codec = "CODEC"
vad = true
barge_in = true
vad_hangover = 0.5
"""


@pytest.fixture
def agent(tmp_path):
    port = _free_port()
    log = open(tmp_path / "agent.log", "w+")  # noqa: SIM115 (read back by the test)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voxrelay",
            "backend",
            "agent",
            "--port",
            str(port),
            "--log-format",
            "json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_for_listener(port)
    try:
        yield f"ws://127.0.0.1:{port}/call", tmp_path / "agent.log"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _fleet(tmp_path, backend_url: str, codec: str) -> LocalFleet:
    fleet = LocalFleet(
        tmp_path / "fleet",
        config=AGENT_FLEET.replace("BACKEND_URL", backend_url).replace("CODEC", codec),
    )
    fleet.cli("up", "--detach")
    return fleet


async def _scripted_call(whip: str, script: Script, seconds: float) -> list[tuple[float, str]]:
    pc = RTCPeerConnection()
    states: list[tuple[float, str]] = []
    pc.on("connectionstatechange", lambda: states.append((time.monotonic(), pc.connectionState)))
    pc.addTrack(ScriptedVoice(script))
    await pc.setLocalDescription(await pc.createOffer())
    async with ClientSession() as http:
        headers = {"Content-Type": "application/sdp"}
        async with http.post(whip, data=pc.localDescription.sdp, headers=headers) as response:
            assert response.status == 201, await response.text()
            answer = await response.text()
            location = str(response.url.join(response.url.with_path(response.headers["Location"])))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

        def first(now: float) -> None:
            script.first_agent_packet = now

        _tap_arrivals(pc, script.arrivals, first)
        await asyncio.sleep(seconds)
        async with http.delete(location):
            pass
    await pc.close()
    return states


def test_agent_answers_at_turn_end_and_stops_within_40_ms_of_a_barge_in(tmp_path, agent):
    backend_url, agent_log = agent
    fleet = _fleet(tmp_path, backend_url, "pcm16")
    try:
        whip = fleet.status()["signaling_url"] + "whip"
        script = Script()
        asyncio.run(_scripted_call(whip, script, seconds=6.0))
        transceiver = fleet.transceiver_status(fleet.status()["local_transceivers"][0])
    finally:
        fleet.cli("down", "--now", check=False)

    assert script.turn_end is not None and script.first_agent_packet is not None, script
    # Turn end: the agent starts answering after the hangover (0.5 s), not before.
    answer_delay = script.first_agent_packet - script.turn_end
    assert 0.3 < answer_delay < 1.5, answer_delay
    # Barge-in: the last agent packet of the interrupted answer arrives within 40 ms of the
    # caller's first barge-in packet (loopback adds well under a millisecond each way).
    assert script.barge_start is not None
    after = [t for t in script.arrivals if t >= script.barge_start]
    interrupted = [after[0]] if after else []
    for previous, current in itertools.pairwise(after):
        if current - previous > 0.15:
            break
        interrupted.append(current)
    last = interrupted[-1] if interrupted else script.barge_start
    assert last - script.barge_start <= 0.040, (last - script.barge_start, len(interrupted))
    # The agent answers the barge-in turn too: audio resumes after it ends.
    assert script.barge_end is not None
    assert any(t > script.barge_end + 0.3 for t in script.arrivals)

    backend = transceiver["backend"]
    assert backend["barge_ins"] >= 1 and backend["speech_started"] >= 2
    lines = [
        json.loads(line) for line in agent_log.read_text().splitlines() if line.startswith("{")
    ]
    (summary,) = [line for line in lines if line.get("msg") == "call over"]
    played, cleared = summary["marks_played"], summary["marks_cleared"]
    assert summary["replies"] >= 2
    assert cleared and cleared[0].startswith("reply-1-"), summary  # the interrupted answer
    assert all(name.startswith("reply-2-") or name.startswith("reply-1-") for name in played)
    reply1 = [name for name in played if name.startswith("reply-1-")]
    assert reply1 == sorted(reply1, key=lambda n: int(n.split("-")[2].rstrip("s") or 0))


async def _echo_backend(connections: list[web.WebSocketResponse]) -> tuple[web.AppRunner, str]:
    """A wire-protocol echo whose connections the test can kill one by one."""
    from voxrelay.proto.backend_wire import SUBPROTOCOL

    async def call(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        connections.append(ws)
        await ws.receive()  # session.started
        async for message in ws:
            if message.type is web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/call", call)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"ws://127.0.0.1:{port}/call"


def test_a_killed_backend_connection_ends_only_its_call_with_a_reason(tmp_path):
    async def scenario():
        connections: list[web.WebSocketResponse] = []
        runner, url = await _echo_backend(connections)
        fleet = await asyncio.to_thread(_fleet, tmp_path, url, "opus")
        try:
            whip = (await asyncio.to_thread(fleet.status))["signaling_url"] + "whip"
            doomed = asyncio.create_task(whip_call(whip, seconds=4.0, frequency=440))
            survivor = asyncio.create_task(whip_call(whip, seconds=4.0, frequency=880))
            for _ in range(100):
                if len(connections) == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)
            connections[0]._req.transport.abort()  # the backend process "dies" for this call
            results = await asyncio.gather(doomed, survivor)
            status = await asyncio.to_thread(fleet.status)
            row = status["local_transceivers"][0]
            transceiver = await asyncio.to_thread(fleet.transceiver_status, row)
            return results, transceiver
        finally:
            await asyncio.to_thread(fleet.cli, "down", "--now", check=False)
            await runner.cleanup()

    (first, second), transceiver = asyncio.run(scenario())
    ended = transceiver["calls_ended"]
    assert ended.get("backend disconnected") == 1, ended
    by_frames = sorted([first, second], key=lambda r: r.loud_frames)
    killed, alive = by_frames
    assert alive.loud_frames >= 100, alive  # 4 s of echo, untouched by the other call
    assert killed.loud_frames < alive.loud_frames - 30
    assert any(state in ("closed", "failed") for _, state in killed.states)


@pytest.mark.parametrize("codec", ["opus", "pcm16"])
def test_out_of_process_echo_backend_echoes_the_tone(tmp_path, codec):
    """`voxrelay backend echo` over the wire: Opus passthrough, or decode + re-encode."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "voxrelay", "backend", "echo", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_listener(port)
        fleet = _fleet(tmp_path, f"ws://127.0.0.1:{port}/call", codec)
        try:
            whip = fleet.status()["signaling_url"] + "whip"
            result = asyncio.run(whip_call(whip, seconds=3.0, frequency=550))
            row = fleet.status()["local_transceivers"][0]
            backend = fleet.transceiver_status(row)["backend"]
        finally:
            fleet.cli("down", "--now", check=False)
    finally:
        process.terminate()
        process.wait(10)
    assert result.connected and result.loud_frames >= 40, result
    assert abs(result.dominant_frequency() - 550) < 25
    assert backend["calls_connected"] == 1 and backend["backend_frames_played"] >= 50
