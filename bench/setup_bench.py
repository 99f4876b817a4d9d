"""``voxrelay bench setup``: call setup time and echo cost, voxrelay beside an aiortc server.

The same aiortc caller (this process) dials, over WHIP, a voxrelay fleet (relay worker ->
transceiver -> echo backend, started with ``voxrelay up --detach`` from a temporary config,
or an already running one with ``--target``) and an aiortc echo server started by the
benchmark in a process of its own, in the same run. What it measures:

- setup: for ``--calls`` calls per server (one after another, ``--concurrency`` at a time,
  the servers taking turns; or all at once with ``--burst``), the time from POSTing the
  offer to the answer, the first successful ICE check, ICE connected (aiortc's
  ``completed``), the peer connection ``connected`` (DTLS done, SRTP keyed) and the first
  echoed RTP packet. The echo is
  timestamped where the caller's DTLS transport hands decrypted RTP on, before aiortc's
  jitter buffer and decoder (which would add ~80 ms); the caller never decodes the echo.
  Medians and p95 are compared with the issue's targets (connected < 20 ms, first echo <
  30 ms at the median), with PASS/MISS beside them; nothing asserts them.
- steady: ``--steady-calls`` calls held for ``--duration`` seconds; the CPU time (user +
  system, psutil) of the transceivers and relay workers, of the aiortc server and of the
  caller over that window, divided by the RTP packets echoed back to the caller.

The aiortc server echoes without transcoding, like voxrelay's echo backend: it takes each
RTP payload below its receiver (no jitter buffer, no decoder) and sends it back through an
aiortc sender as a pre-encoded packet (no encoder), so both sides do the same work: SRTP
in, RTP out, SRTP out. The caller sends a tone encoded once with Opus and replayed in real
time, so its CPU goes to the calls rather than to the encoder.

aiortc's ICE (aioice) starts one check per 20 ms tick and notices a finished check list
only at its next tick, so ICE connected cannot come sooner than ~20 ms after the answer
whatever the server does; ``ice_check`` shows when the server really answered, and
``--prompt-ice`` lets the caller go on as soon as its check list completes (both servers
alike). Either way DTLS starts only once aiortc has left ICE, and an aiortc server, which
runs the same aioice as the DTLS client, starts its handshake only at its own tick.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fractions
import functools
import json
import math
import os
import secrets
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import psutil

from voxrelay.bench.common import (
    BenchError,
    CliFleet,
    call_timeout_option,
    cpu_seconds,
    fmt,
    ratio_of,
    report_header,
    run_reporting_errors,
    temporary_fleet_options,
    terminate_as_interrupt,
)
from voxrelay.bench.plot import (
    PlotError,
    colour_for,
    grouped_bars,
    pyplot,
    save_figure,
    target_marker,
)

if TYPE_CHECKING:  # aiortc, av and aiohttp load when a benchmark runs, not with every CLI call
    from aiohttp import ClientSession, web
    from aiortc import MediaStreamTrack, RTCPeerConnection
    from av import Packet

TARGET_CONNECTED_MS = 20.0  # voxrelay, median, with this aiortc caller: below
TARGET_FIRST_ECHO_MS = 30.0
MILESTONES = ("answer", "ice_check", "ice_connected", "connected", "first_echo")
MILESTONE_LABELS = {
    "answer": "answer received",
    "ice_check": "ICE check answered",
    "ice_connected": "ICE connected",
    "connected": "DTLS connected",
    "first_echo": "first echoed RTP",
}
SERVERS = ("voxrelay", "aiortc")
SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
OPUS_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
CALLER_BITRATE = 32_000  # what a browser sends for speech
STEADY_SETUP_CONCURRENCY = 4  # calls dialled at once when filling the steady phase
STEADY_WARMUP_S = 1.0
SETUP_GAP_S = 0.02  # between one call's hang-up and the next dial, in a ramp


# -- audio -----------------------------------------------------------------------------------


def encoded_tone(seconds: float = 1.0, frequency: float = 440.0) -> list[bytes]:
    """Opus packets (20 ms each) of a sine tone, encoded once for every call to replay."""
    from aiortc.codecs.opus import OpusEncoder
    from av import AudioFrame

    encoder = OpusEncoder()
    encoder.codec.bit_rate = CALLER_BITRATE
    packets: list[bytes] = []
    for index in range(round(seconds * SAMPLE_RATE / FRAME_SAMPLES) + 2):
        first = index * FRAME_SAMPLES
        pcm = array.array(
            "h",
            (
                int(9830 * math.sin(2 * math.pi * frequency * (first + n) / SAMPLE_RATE))
                for n in range(FRAME_SAMPLES)
            ),
        )
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts = first
        frame.time_base = OPUS_TIME_BASE
        payloads, _ = encoder.encode(frame)
        packets.extend(payloads)
    if not packets:
        raise BenchError("the Opus encoder returned no packets for the caller's tone")
    return packets


def _opus_packet(payload: bytes, pts: int) -> Packet:
    from av import Packet

    packet = Packet(payload)
    packet.pts = pts
    packet.time_base = OPUS_TIME_BASE
    return packet


class ToneReplay:
    """Pre-encoded Opus packets in real time, 20 ms apart, as a microphone would give them."""

    def __init__(self, packets: Sequence[bytes]) -> None:
        self._packets = packets
        self._start: float | None = None
        self.sent = 0

    async def next_packet(self) -> Packet:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self.sent * FRAME_SAMPLES / SAMPLE_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        payload = self._packets[self.sent % len(self._packets)]
        packet = _opus_packet(payload, self.sent * FRAME_SAMPLES)
        self.sent += 1
        return packet


class EchoQueue:
    """What the aiortc server sends: the caller's RTP payloads, untouched, on their timestamps."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Packet] = asyncio.Queue()
        self._first_timestamp: int | None = None

    def push(self, payload: bytes, timestamp: int) -> None:
        if self._first_timestamp is None:
            self._first_timestamp = timestamp
        pts = (timestamp - self._first_timestamp) & 0xFFFFFFFF
        self._queue.put_nowait(_opus_packet(payload, pts))

    async def next_packet(self) -> Packet:
        return await self._queue.get()


@functools.cache
def _source_track_type() -> type:
    from aiortc import MediaStreamTrack

    class SourceTrack(MediaStreamTrack):
        """An aiortc audio track sending a source's packets as they are (no encoder)."""

        kind = "audio"

        def __init__(self, source: ToneReplay | EchoQueue) -> None:
            super().__init__()
            self.source = source

        async def recv(self) -> Packet:
            return await self.source.next_packet()

    return SourceTrack


def audio_track(source: ToneReplay | EchoQueue) -> MediaStreamTrack:
    """An aiortc track for ``source`` (the class is made on first use, importing aiortc)."""
    return _source_track_type()(source)


def tap_rtp(pc: RTCPeerConnection, on_rtp: Callable[[bytes], None]) -> None:
    """Hand every decrypted RTP packet of ``pc``'s first transceiver to ``on_rtp``, and only
    to it: the packets never reach aiortc's receiver, jitter buffer or decoder.

    This replaces a private method of aiortc's RTCDtlsTransport (aiortc 1.16) on the
    instance: the place where SRTP has just been removed, at packet arrival.
    """
    transport = pc.getTransceivers()[0].receiver.transport
    if not callable(getattr(transport, "_handle_rtp_data", None)):
        raise BenchError("this aiortc has no RTCDtlsTransport._handle_rtp_data to tap RTP at")

    async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        on_rtp(data)

    transport._handle_rtp_data = handle_rtp_data


# -- the caller ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallerSettings:
    bearer: str | None
    call_timeout: float
    prompt_ice: bool


class BenchCall:
    """One aiortc call: dial over WHIP, stamp the setup milestones, count the echo."""

    def __init__(self, whip_url: str, packets: Sequence[bytes], settings: CallerSettings) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.whip_url = whip_url
        self.settings = settings
        self.tone = ToneReplay(packets)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.location: str | None = None
        self.error = ""
        self.echoed = 0
        self._posted: float | None = None
        self.milestones: dict[str, float] = {}  # ms since the offer was POSTed
        self._echo_heard = asyncio.Event()
        self._nominated = asyncio.Event()
        self._background: set[asyncio.Future] = set()

    # ---------------------------------------------------------------- milestones

    def _mark(self, name: str) -> None:
        if self._posted is not None and name not in self.milestones:
            self.milestones[name] = (time.perf_counter() - self._posted) * 1000

    def _on_echo(self, data: bytes) -> None:
        self._mark("first_echo")
        self.echoed += 1
        self._echo_heard.set()

    def _watch(self) -> None:
        pc = self.pc

        @pc.on("iceconnectionstatechange")
        def _ice_state() -> None:
            if pc.iceConnectionState == "completed":
                self._mark("ice_connected")

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected":
                self._mark("connected")

        tap_rtp(pc, self._on_echo)
        self._hook_ice(pc.getTransceivers()[0].receiver.transport.transport)

    def _hook_ice(self, ice_transport: Any) -> None:
        """Stamp the first successful check; with --prompt-ice, leave ICE as soon as a pair is
        nominated instead of at aioice's next 20 ms tick.

        Reaches into aioice's Connection (0.13); the milestone is skipped if that changes.
        """
        connection = getattr(ice_transport, "_connection", None)
        check_complete = getattr(connection, "check_complete", None)
        if check_complete is None:
            return

        def hooked_check_complete(pair: Any) -> None:
            check_complete(pair)
            if getattr(pair.state, "name", "") == "SUCCEEDED":
                self._mark("ice_check")
            if getattr(connection, "_check_list_done", False) and connection._nominated:
                self._nominated.set()

        connection.check_complete = hooked_check_complete
        if not self.settings.prompt_ice:
            return
        connect = connection.connect

        async def prompt_connect() -> None:
            task = asyncio.ensure_future(connect())
            waiter = asyncio.ensure_future(self._nominated.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task.done():
                return task.result()
            # aioice's check loop ends at its next tick and starts consent checks then.
            self._background.add(task)
            task.add_done_callback(self._forget_background)

        connection.connect = prompt_connect

    def _forget_background(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn: ICE was up by then

    # ---------------------------------------------------------------- dialling

    async def dial(self, http: ClientSession) -> None:
        """Offer, POST, answer; returns once the first echo arrived, or records the error."""
        try:
            await asyncio.wait_for(self._dial(http), self.settings.call_timeout)
        except TimeoutError:
            reached = max(self.milestones, key=self.milestones.get, default="POST")
            self.error = f"no echo within {self.settings.call_timeout:g} s (reached {reached})"
        except Exception as exc:  # aiortc, aiohttp or the server: the call failed, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"

    async def _dial(self, http: ClientSession) -> None:
        from aiortc import RTCSessionDescription

        pc = self.pc
        pc.addTrack(audio_track(self.tone))
        await pc.setLocalDescription(await pc.createOffer())
        self._watch()
        headers = {"Content-Type": "application/sdp"}
        if self.settings.bearer:
            headers["Authorization"] = f"Bearer {self.settings.bearer}"
        self._posted = time.perf_counter()
        async with http.post(self.whip_url, data=pc.localDescription.sdp, headers=headers) as r:
            answer = await r.text()
            self._mark("answer")
            if r.status != 201:
                raise BenchError(f"WHIP POST answered {r.status}: {answer.strip()[:200]}")
            self.location = r.headers.get("Location")
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await self._echo_heard.wait()

    @property
    def echoing(self) -> bool:
        return not self.error and "first_echo" in self.milestones

    @property
    def sent(self) -> int:
        return self.tone.sent

    async def hang_up(self, http: ClientSession) -> None:
        """DELETE the WHIP session (errors ignored: the server may have ended it) and close."""
        from aiohttp import ClientError
        from yarl import URL

        location, self.location = self.location, None  # a second hang-up only closes
        if location:
            target = str(URL(self.whip_url).join(URL(location)))
            headers = {}
            if self.settings.bearer:
                headers["Authorization"] = f"Bearer {self.settings.bearer}"
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                async with http.delete(target, headers=headers) as response:
                    await response.read()
        await self.pc.close()
        for task in list(self._background):
            task.cancel()

    def as_dict(self) -> dict[str, Any]:
        return {
            "milestones_ms": {k: round(v, 3) for k, v in self.milestones.items()},
            "echoed": self.echoed,
            "error": self.error or None,
        }


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default), None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else None,
        "p95": percentile(values, 0.95),
        "min": min(values, default=None),
        "max": max(values, default=None),
    }


def summarize_calls(calls: Sequence[BenchCall]) -> dict[str, Any]:
    """Milestone statistics over the calls that reached their first echo."""
    good = [call for call in calls if call.echoing]
    return {
        "calls": len(calls),
        "echoing": len(good),
        "failed": len(calls) - len(good),
        "errors": sorted({call.error for call in calls if call.error}),
        "milestones_ms": {
            name: summarize([c.milestones[name] for c in good if name in c.milestones])
            for name in MILESTONES
        },
        "per_call": [call.as_dict() for call in calls],
    }


# -- the servers under test -----------------------------------------------------------------


def _local_process(pid: int | None) -> bool:
    """Whether ``pid`` is a process on this machine we may read the CPU time of."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).is_running()
    except psutil.Error:
        return False


@dataclass
class EchoServer:
    """A WHIP endpoint under test and the processes whose CPU time is its cost."""

    name: str
    whip_url: str
    processes: dict[str, list[int]]
    """Process group (``transceiver``, ``relay``; ``server``) -> pids; empty if not local."""
    counter_urls: list[str] = field(default_factory=list)
    """Transceiver /status URLs, for datagrams_in/out."""
    description: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        return {group: cpu_seconds(pids, group) for group, pids in self.processes.items()}

    async def counters(self, http: ClientSession) -> dict[str, int] | None:
        if not self.counter_urls:
            return None
        from aiohttp import ClientError, ClientTimeout

        totals = {"datagrams_in": 0, "datagrams_out": 0}
        try:
            for url in self.counter_urls:
                async with http.get(url, timeout=ClientTimeout(total=5)) as response:
                    status = await response.json(content_type=None)
                for key in totals:
                    totals[key] += int(status[key])
        except (ClientError, OSError, TimeoutError, KeyError, ValueError):
            return None
        return totals

    def as_dict(self) -> dict[str, Any]:
        return {"whip_url": self.whip_url, "pids": self.processes, **self.description}


def _fetch_json(url: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchError(f"{url} does not answer with JSON: {exc}") from exc


def voxrelay_server(status: dict[str, Any], source: str) -> EchoServer:
    """The fleet (supervisor /status) or the single transceiver (its own /status) to dial."""
    if "local_transceivers" in status:  # a supervisor's view (whole fleet, or transceivers)
        if not status.get("signaling_url"):
            raise BenchError(f"the fleet at {source} runs no transceiver with signaling")
        transceivers = status.get("local_transceivers") or []
        relay = status.get("relay") or {}  # none on a transceiver-only host
        workers = relay.get("workers") or []
        processes = {
            "transceiver": [int(row["pid"]) for row in transceivers if row.get("pid")],
            "relay": [int(w["pid"]) for w in workers if w.get("pid")],
        }
        if not processes["relay"]:
            del processes["relay"]  # the relays are elsewhere: their CPU is not ours to read
        counter_urls = [
            row["private_url"] + "status" for row in transceivers if row.get("private_url")
        ]
        if not counter_urls:
            counter_urls = [status["signaling_url"] + "status"]
        description = {
            "kind": "fleet",
            "transceivers": len(transceivers),
            "relay_workers": len(workers),
            "relay": f"{relay['public_address']}:{relay['port']}" if relay else None,
        }
    elif "datagrams_in" in status:  # a transceiver dialled directly (no relay in the path)
        processes = {"transceiver": [int(status["pid"])]}
        counter_urls = [status["signaling_url"] + "status"]
        description = {"kind": "transceiver", "transceivers": 1, "relay_workers": 0}
    else:
        raise BenchError(f"{source} is neither a voxrelay fleet's nor a transceiver's /status")
    if not all(_local_process(pid) for pids in processes.values() for pid in pids):
        processes = {}  # not on this machine: no CPU figures
        description["cpu"] = "not measured: the processes are not on this machine"
    return EchoServer(
        name="voxrelay",
        whip_url=status["signaling_url"] + "whip",
        processes=processes,
        counter_urls=counter_urls,
        description=description,
    )


def target_server(url: str) -> EchoServer:
    """``--target``: a fleet's status URL (http://host:port from `voxrelay status`) or a
    transceiver's signaling URL; its /status says which."""
    return voxrelay_server(fetch_status(url), url)


def fetch_status(url: str) -> dict[str, Any]:
    """A fleet's /status (``url`` from `voxrelay status`) or one transceiver's (its signaling
    URL, with or without /whip)."""
    base = url.rstrip("/").removesuffix("/status").removesuffix("/whip")
    return _fetch_json(base + "/status")


class TemporaryFleet(CliFleet):
    """A fleet of our own, up and down through the CLI like an operator would."""

    def __init__(self, workdir: Path, transceivers: int, workers: int) -> None:
        super().__init__(workdir)
        self.status: dict[str, Any] = {}
        lines = [
            *self.identity_lines(f"setup{secrets.token_hex(4)}", 1, secrets.token_bytes(32)),
            "[relay]",
            'bind = "127.0.0.1"',
            "port = 0",
            f"workers = {workers}",
            "drain_seconds = 0",
            "[metrics]",
            'bind = "127.0.0.1"',
            "port = 0",
            "[transceiver]",
            f"count = {transceivers}",
            "port = 0",
            "signaling_port = 0",
        ]
        self.write_config(lines)

    def start(self) -> dict[str, Any]:
        self.up(timeout=60)
        status = self._cli("status", "--json", timeout=30)
        try:
            self.status = json.loads(status.stdout)
        except ValueError:
            raise BenchError(
                f"`voxrelay status --json` printed no JSON: {status.stderr.strip()}"
            ) from None
        return self.status

    def close(self) -> None:
        """`voxrelay down --now`, then kill whatever of ours is left (up may have half failed)."""
        from voxrelay.engine.supervisor import read_state

        state = read_state(self.runtime_dir)
        pids = [int(state.get("pid", 0))] if state else []
        if self.status:
            pids.append(int(self.status.get("pid", 0)))
            workers = (self.status.get("relay") or {}).get("workers") or []
            pids += [int(w.get("pid") or 0) for w in workers]
            pids += [int(t.get("pid") or 0) for t in self.status.get("local_transceivers", [])]
        self.down(pids, via_cli=bool(state))
        self.status = {}


class AiortcEchoProcess:
    """The baseline: :func:`serve_aiortc_echo` in a process of its own."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._spawn(["voxrelay.bench.setup_bench", "aiortc-echo-server"], timeout)

    def _spawn(self, module_and_args: list[str], timeout: float) -> None:
        """Run ``python -m module args`` and wait for the server's line saying it listens."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", *module_and_args],
            stdin=subprocess.PIPE,  # closed when we go: the server stops at end of input
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            self.info = self._read_ready(timeout)
        except BaseException:
            self.close()
            raise

    def _read_ready(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise BenchError(
                f"the aiortc echo server did not start within {timeout:g} s "
                f"(exit status {self.process.poll()})"
            )
        return json.loads(line)

    def server(self) -> EchoServer:
        return EchoServer(
            name="aiortc",
            whip_url=self.info["whip_url"],
            processes={"server": [self.process.pid]},
            description={"kind": "aiortc echo server", "echo": "passthrough (no transcoding)"},
        )

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# -- the aiortc echo server (runs in its own process) ---------------------------------------


class AiortcEchoApp:
    """WHIP over aiohttp, answered by aiortc, echoing each RTP payload as it arrives."""

    offer_errors: tuple[type[Exception], ...] = (ValueError, AttributeError)  # answered 400

    def __init__(self) -> None:
        self.calls: dict[str, RTCPeerConnection] = {}
        self.calls_started = 0

    def app(self) -> web.Application:
        from aiohttp import web

        app = web.Application()
        app.add_routes(
            [
                web.post("/whip", self.post_offer),
                web.delete("/whip/{call}", self.delete_call),
                web.get("/status", self.status),
            ]
        )
        return app

    async def post_offer(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        offer = await request.text()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        call_id = secrets.token_hex(8)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            echo = self.add_echo_track(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except self.offer_errors as exc:
            await pc.close()
            return web.Response(status=400, text=f"cannot accept this offer: {exc}")
        self.start_echo(pc, echo)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._end(call_id)

        self.calls[call_id] = pc
        self.calls_started += 1
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whip/{call_id}"},
        )

    def add_echo_track(self, pc: RTCPeerConnection) -> EchoQueue | None:
        """Before the answer: add the track ``pc`` sends back; returns what feeds it."""
        echo = EchoQueue()
        pc.addTrack(audio_track(echo))
        return echo

    def start_echo(self, pc: RTCPeerConnection, echo: EchoQueue | None) -> None:
        """After the answer: feed each received RTP payload, undecoded, to ``echo``."""
        from aiortc.rtp import RtpPacket

        assert echo is not None

        def on_rtp(data: bytes) -> None:
            with contextlib.suppress(ValueError):
                packet = RtpPacket.parse(data)
                echo.push(packet.payload, packet.timestamp)

        tap_rtp(pc, on_rtp)

    async def delete_call(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if request.match_info["call"] not in self.calls:
            return web.Response(status=404, text="no such session")
        await self._end(request.match_info["call"])
        return web.Response(status=200)

    async def status(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(
            {"pid": os.getpid(), "calls": len(self.calls), "calls_started": self.calls_started}
        )

    async def _end(self, call_id: str) -> None:
        pc = self.calls.pop(call_id, None)
        if pc is not None:
            await pc.close()

    async def close(self) -> None:
        for call_id in list(self.calls):
            await self._end(call_id)


def serve_aiortc_echo(host: str = "127.0.0.1") -> None:
    """Serve until SIGTERM or end of stdin; print ``{"whip_url", "pid"}`` once listening."""
    serve_echo_app(AiortcEchoApp, host)


def serve_echo_app(
    make_app: Callable[[], AiortcEchoApp], host: str = "127.0.0.1", backlog: int = 128
) -> None:
    """Serve ``make_app()`` until SIGTERM or end of stdin; print ``{"whip_url", "pid"}`` once
    listening.

    aiortc gathers every interface's address but loopback's; here it gathers ``host``
    only (loopback for the benches), like voxrelay's answers, so no benchmark traffic goes
    to the machine's LAN address.
    """
    import aioice.ice
    from aiohttp import web

    def only_our_host(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [host] if (":" in host and use_ipv6) or (":" not in host and use_ipv4) else []

    aioice.ice.get_host_addresses = only_our_host

    async def main() -> None:
        echo = make_app()
        runner = web.AppRunner(echo.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, 0, backlog=backlog).start()
        port = runner.addresses[0][1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # Ctrl-C reaches the whole process group; the bench decides when we stop.
        loop.add_signal_handler(signal.SIGINT, lambda: None)

        def wait_for_end_of_input() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_end_of_input, daemon=True).start()
        print(json.dumps({"whip_url": f"http://{host}:{port}/whip", "pid": os.getpid()}))
        sys.stdout.flush()
        await stop.wait()
        await echo.close()
        await runner.cleanup()

    asyncio.run(main())


# -- phases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupSettings:
    calls: int
    concurrency: int
    burst: bool
    steady_calls: int
    duration: float
    call_timeout: float
    prompt_ice: bool
    bearer: str | None
    target: str | None
    transceivers: int
    workers: int

    def caller(self) -> CallerSettings:
        return CallerSettings(self.bearer, self.call_timeout, self.prompt_ice)

    def as_dict(self) -> dict[str, Any]:
        import aioice
        import aiortc

        return {
            "calls": self.calls,
            "concurrency": self.calls if self.burst else self.concurrency,
            "burst": self.burst,
            "steady_calls": self.steady_calls,
            "duration_s": self.duration,
            "call_timeout_s": self.call_timeout,
            "prompt_ice": self.prompt_ice,
            "target": self.target,
            "transceivers": None if self.target else self.transceivers,
            "relay_workers": None if self.target else self.workers,
            "caller": {
                "aiortc": aiortc.__version__,
                "aioice": getattr(aioice, "__version__", None),
                "opus_bitrate": CALLER_BITRATE,
            },
        }


HANG_UP_TIMEOUT = 15.0


async def _hang_up_all(calls: Sequence[BenchCall], http: ClientSession) -> None:
    """Hang up every call; give up after HANG_UP_TIMEOUT (the servers get stopped anyway)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(call.hang_up(http) for call in calls)), HANG_UP_TIMEOUT
        )


async def setup_phase(
    servers: dict[str, EchoServer], settings: SetupSettings, packets: Sequence[bytes]
) -> dict[str, list[BenchCall]]:
    """Per server a warm-up call (not counted: it opens the HTTP connection), then ``calls``.

    In a ramp the servers take turns call by call, so a noisy moment on a shared machine
    hits both alike; a burst dials all of one server's calls at once, then the other's.
    """
    from aiohttp import ClientSession, ClientTimeout

    caller = settings.caller()
    warmups = {name: BenchCall(s.whip_url, packets, caller) for name, s in servers.items()}
    calls = {
        name: [BenchCall(server.whip_url, packets, caller) for _ in range(settings.calls)]
        for name, server in servers.items()
    }
    turns = [(name, calls[name][i]) for i in range(settings.calls) for name in servers]
    turns.reverse()
    async with contextlib.AsyncExitStack() as stack:
        timeout = ClientTimeout(total=settings.call_timeout)
        http = {
            name: await stack.enter_async_context(ClientSession(timeout=timeout))
            for name in servers
        }

        async def dial_in_turn() -> None:
            while turns:
                name, call = turns.pop()
                await call.dial(http[name])
                await call.hang_up(http[name])
                await asyncio.sleep(SETUP_GAP_S)

        try:
            for name, warmup in warmups.items():
                await warmup.dial(http[name])
                await warmup.hang_up(http[name])
                if not warmup.echoing:
                    raise BenchError(f"{name}: the warm-up call failed: {warmup.error}")
            if settings.burst:
                for name in servers:
                    await asyncio.gather(*(call.dial(http[name]) for call in calls[name]))
                    await _hang_up_all(calls[name], http[name])
            else:
                workers = settings.concurrency * len(servers)
                await asyncio.gather(*(dial_in_turn() for _ in range(workers)))
        finally:  # the calls still up, if interrupted
            for name in servers:
                await _hang_up_all([warmups[name], *calls[name]], http[name])
    return calls


def _share(cpu: float | None, elapsed: float) -> float | None:
    return None if cpu is None else cpu / elapsed


def _per_packet_us(cpu: float | None, packets: int) -> float | None:
    return None if cpu is None or packets <= 0 else cpu * 1e6 / packets


async def steady_phase(
    server: EchoServer, settings: SetupSettings, packets: Sequence[bytes]
) -> dict[str, Any]:
    """``steady_calls`` calls echoing for ``duration`` s: CPU per echoed RTP packet."""
    from aiohttp import ClientSession, ClientTimeout

    caller = settings.caller()
    me = psutil.Process()
    async with ClientSession(timeout=ClientTimeout(total=settings.call_timeout)) as http:
        calls = [BenchCall(server.whip_url, packets, caller) for _ in range(settings.steady_calls)]
        gate = asyncio.Semaphore(STEADY_SETUP_CONCURRENCY)

        async def dial(call: BenchCall) -> None:
            async with gate:
                await call.dial(http)

        try:
            await asyncio.gather(*(dial(call) for call in calls))
            failed = [call.error for call in calls if not call.echoing]
            if failed:
                raise BenchError(
                    f"{server.name}: {len(failed)} of {len(calls)} steady calls failed: "
                    f"{sorted(set(failed))}"
                )
            await asyncio.sleep(STEADY_WARMUP_S)
            counters_before = await server.counters(http)
            cpu_before, caller_before = server.cpu(), me.cpu_times()
            echoed_before = sum(call.echoed for call in calls)
            sent_before = sum(call.sent for call in calls)
            started = time.perf_counter()
            await asyncio.sleep(settings.duration)
            elapsed = time.perf_counter() - started
            cpu_after, caller_after = server.cpu(), me.cpu_times()
            echoed = sum(call.echoed for call in calls) - echoed_before
            sent = sum(call.sent for call in calls) - sent_before
            counters_after = await server.counters(http)
        finally:
            await _hang_up_all(calls, http)
    caller_cpu = (caller_after.user + caller_after.system) - (
        caller_before.user + caller_before.system
    )
    processes = {}
    for group, before in cpu_before.items():
        cpu = cpu_after[group] - before
        processes[group] = {
            "pids": server.processes[group],
            "cpu_s": cpu,
            "cpu_share": _share(cpu, elapsed),
            "cpu_us_per_echoed_packet": _per_packet_us(cpu, echoed),
        }
    result: dict[str, Any] = {
        "calls": len(calls),
        "elapsed_s": elapsed,
        "sent_packets": sent,
        "echoed_packets": echoed,
        # Packets in flight at the window's edges can make this a hair negative: clamped.
        "echo_loss": max(0.0, 1 - echoed / sent) if sent else None,
        "processes": processes,
        "caller": {
            "cpu_s": caller_cpu,
            "cpu_share": _share(caller_cpu, elapsed),
            "cpu_us_per_echoed_packet": _per_packet_us(caller_cpu, echoed),
        },
    }
    if counters_before and counters_after:
        result["transceiver_datagrams"] = {
            key: counters_after[key] - counters_before[key] for key in counters_before
        }
    return result


# -- report ---------------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    done: int = 0

    def phase(self, text: str) -> None:
        self.done += 1
        click.echo(f"[{self.done}/{self.total}] {text}")


def _echo_cpu(steady: dict[str, Any]) -> float | None:
    """CPU µs per echoed packet of the whole echo path: every process group together."""
    groups = steady["processes"]
    if not groups:
        return None
    return _per_packet_us(sum(g["cpu_s"] for g in groups.values()), steady["echoed_packets"])


def targets(setup: dict[str, Any]) -> dict[str, Any]:
    milestones = setup["voxrelay"]["milestones_ms"]
    result = {}
    for key, name, limit in (
        ("connected_median_ms", "connected", TARGET_CONNECTED_MS),
        ("first_echo_median_ms", "first_echo", TARGET_FIRST_ECHO_MS),
    ):
        value = milestones[name]["median"]
        result[key] = {
            "value": value,
            "target_max": limit,
            "pass": value is not None and value < limit,
        }
    return result


def ratios(steady: dict[str, Any]) -> dict[str, Any]:
    vox, aiortc = steady["voxrelay"], steady["aiortc"]
    server = aiortc["processes"].get("server", {}).get("cpu_us_per_echoed_packet")
    transceiver = vox["processes"].get("transceiver", {}).get("cpu_us_per_echoed_packet")
    return {
        "transceiver_over_aiortc": ratio_of(transceiver, server),
        "voxrelay_total_over_aiortc": ratio_of(_echo_cpu(vox), server),
        "caller_voxrelay_over_aiortc": ratio_of(
            vox["caller"]["cpu_us_per_echoed_packet"], aiortc["caller"]["cpu_us_per_echoed_packet"]
        ),
    }


def build_report(
    settings: SetupSettings,
    servers: dict[str, EchoServer],
    setup: dict[str, Any],
    steady: dict[str, Any],
) -> dict[str, Any]:
    return {
        **report_header("voxrelay bench setup"),
        "settings": settings.as_dict(),
        "servers": {name: server.as_dict() for name, server in servers.items()},
        "setup": setup,
        "steady": steady,
        "targets": targets(setup),
        "ratios": ratios(steady),
        "notes": [
            "setup milestones are ms since the caller started POSTing its offer (the HTTP "
            "connection is already open: a warm-up call per server opened it); "
            "ice_connected is aiortc's iceConnectionState 'completed', connected its "
            "connectionState 'connected' (DTLS done, SRTP keyed), first_echo the arrival of "
            "the first echoed RTP packet, stamped right after SRTP, before any jitter buffer.",
            "aioice paces checks on a 20 ms tick and leaves ICE only at the tick after its "
            "check list completes: ice_connected >= ~20 ms with this caller whatever the "
            "server; ice_check is when the server's answer to the first check arrived. "
            "settings.prompt_ice: the caller left ICE as soon as a pair was nominated.",
            "the aiortc server echoes without transcoding: RTP payloads taken right after "
            "SRTP and sent back as pre-encoded packets (no jitter buffer, decoder or "
            "encoder), as voxrelay's echo backend does.",
            "steady: cpu_us_per_echoed_packet is a process group's user+system CPU time over "
            "the RTP packets echoed back to the caller in the window (each one crossed the "
            "echo path twice); voxrelay's relay workers are counted apart from its "
            "transceivers; the aiortc server is dialled directly, with no relay.",
        ],
    }


def render_table(data: dict[str, Any]) -> str:
    s, setup, steady = data["settings"], data["setup"], data["steady"]
    mode = "all at once" if s["burst"] else f"{s['concurrency']} at a time, taking turns"
    vox, aio = setup["voxrelay"], setup["aiortc"]
    target_for = {
        "connected": data["targets"]["connected_median_ms"],
        "first_echo": data["targets"]["first_echo_median_ms"],
    }

    def row(label: str, v: str, a: str, extra: str = "") -> str:
        return f"{label:<34}{v:>18}{a:>18}  {extra}".rstrip()

    lines = [
        f"voxrelay bench setup: {s['calls']} calls ({mode}), then {s['steady_calls']} calls "
        f"for {s['duration_s']:g} s; caller aiortc {s['caller']['aiortc']}"
        + (" with --prompt-ice" if s["prompt_ice"] else ""),
        row("setup, ms after the POST", "voxrelay p50/p95", "aiortc p50/p95", "target (p50)"),
    ]
    for name in MILESTONES:
        v, a = vox["milestones_ms"][name], aio["milestones_ms"][name]
        extra = ""
        if name in target_for:
            entry = target_for[name]
            verdict = "PASS" if entry["pass"] else "MISS"
            extra = f"< {entry['target_max']:g}  {verdict}"
        lines.append(
            row(
                f"  {MILESTONE_LABELS[name]}",
                f"{fmt(v['median'])} / {fmt(v['p95'])}",
                f"{fmt(a['median'])} / {fmt(a['p95'])}",
                extra,
            )
        )
    lines.append(
        row(
            "  calls echoing",
            f"{vox['echoing']}/{vox['calls']}",
            f"{aio['echoing']}/{aio['calls']}",
        )
    )
    sv, sa, r = steady["voxrelay"], steady["aiortc"], data["ratios"]
    transceiver = sv["processes"].get("transceiver", {})
    relay = sv["processes"].get("relay", {})
    server = sa["processes"].get("server", {})
    lines += [
        row(
            f"CPU µs per echoed packet, {s['steady_calls']} calls",
            "voxrelay",
            "aiortc",
            "voxrelay / aiortc",
        ),
        row(
            "  transceiver | aiortc server",
            fmt(transceiver.get("cpu_us_per_echoed_packet")),
            fmt(server.get("cpu_us_per_echoed_packet")),
            fmt(r["transceiver_over_aiortc"], ".2f") + "x",
        ),
        row("  relay workers", fmt(relay.get("cpu_us_per_echoed_packet")), "-"),
        row(
            "  echo path total",
            fmt(_echo_cpu(sv)),
            fmt(server.get("cpu_us_per_echoed_packet")),
            fmt(r["voxrelay_total_over_aiortc"], ".2f") + "x",
        ),
        row(
            "  caller (aiortc, this process)",
            fmt(sv["caller"]["cpu_us_per_echoed_packet"]),
            fmt(sa["caller"]["cpu_us_per_echoed_packet"]),
        ),
        row(
            "  echoed packets / loss",
            f"{sv['echoed_packets']:,} / {fmt(sv['echo_loss'], '.1%')}",
            f"{sa['echoed_packets']:,} / {fmt(sa['echo_loss'], '.1%')}",
        ),
    ]
    return "\n".join(lines)


def plot_report(data: dict[str, Any], path: Path) -> Path:
    """setup.png: median milestones (with targets), CDFs, CPU per echoed packet."""
    plt = pyplot()
    setup, steady, s = data["setup"], data["steady"], data["settings"]
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    figure.suptitle(
        f"voxrelay bench setup - {s['calls']} calls "
        f"({'all at once' if s['burst'] else str(s['concurrency']) + ' at a time'}), "
        f"aiortc {s['caller']['aiortc']} caller" + (", prompt ICE" if s["prompt_ice"] else ""),
        fontsize=11,
    )
    bars = axes[0]
    placed = grouped_bars(
        bars,
        ["answer", "ICE\ncheck", "ICE\nconnected", "DTLS\nconnected", "first\necho"],
        {name: [setup[name]["milestones_ms"][m]["median"] for m in MILESTONES] for name in SERVERS},
        title="Median time after the offer POST (lower is better)",
        ylabel="ms",
        value_format="{:.1f}",
    )
    for milestone in ("connected", "first_echo"):
        entry = data["targets"][f"{milestone}_median_ms"]
        centre, width = placed["voxrelay"][MILESTONES.index(milestone)]
        target_marker(
            bars,
            centre,
            width,
            entry["target_max"],
            f"target {entry['target_max']:g}",
            bar_height=entry["value"],
            passed=entry["pass"],
        )
    bars.legend(fontsize=8)

    cdf = axes[1]
    for index, name in enumerate(SERVERS):
        colour = colour_for(name, index)
        for milestone, style in (("connected", "--"), ("first_echo", "-")):
            values = sorted(
                call["milestones_ms"][milestone]
                for call in setup[name]["per_call"]
                if milestone in call["milestones_ms"] and not call["error"]
            )
            if values:
                cdf.step(
                    [values[0], *values],
                    [i / len(values) for i in range(len(values) + 1)],
                    where="post",
                    linestyle=style,
                    color=colour,
                    label=f"{name} {MILESTONE_LABELS[milestone]}",
                )
    cdf.set_title("CDF over calls", fontsize=10)
    cdf.set_xlabel("ms after the offer POST")
    cdf.set_ylabel("fraction of calls")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize=8)

    vox, aio = steady["voxrelay"], steady["aiortc"]
    grouped_bars(
        axes[2],
        ["transceiver | server", "echo path total", "caller"],
        {
            "voxrelay": [
                vox["processes"].get("transceiver", {}).get("cpu_us_per_echoed_packet"),
                _echo_cpu(vox),
                vox["caller"]["cpu_us_per_echoed_packet"],
            ],
            "aiortc": [
                aio["processes"].get("server", {}).get("cpu_us_per_echoed_packet"),
                _echo_cpu(aio),
                aio["caller"]["cpu_us_per_echoed_packet"],
            ],
        },
        title=f"CPU per echoed packet, {s['steady_calls']} calls (lower is better)",
        ylabel="µs",
        value_format="{:.0f}",
    )
    axes[2].legend(fontsize=8)
    return save_figure(figure, path)


# -- the run --------------------------------------------------------------------------------


async def measure(
    servers: dict[str, EchoServer], settings: SetupSettings, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    packets = encoded_tone()
    setup: dict[str, Any] = {}
    steady: dict[str, Any] = {}
    calls = await setup_phase(servers, settings, packets)
    for name in SERVERS:
        setup[name] = summarize_calls(calls[name])
        m = setup[name]["milestones_ms"]
        progress.phase(
            f"{name} setup: {setup[name]['echoing']}/{settings.calls} calls echoing, connected p50 "
            f"{fmt(m['connected']['median'])} ms, first echo p50 "
            f"{fmt(m['first_echo']['median'])} ms"
        )
    for name in SERVERS:
        steady[name] = await steady_phase(servers[name], settings, packets)
        progress.phase(
            f"{name} steady: {steady[name]['echoed_packets']:,} packets echoed, "
            f"{fmt(_echo_cpu(steady[name]))} µs CPU each (echo path)"
        )
    return setup, steady


async def interruptible(coroutine: Awaitable[Any]) -> Any:
    """Await ``coroutine``; SIGINT or SIGTERM cancel it (its calls hang up) and raise
    KeyboardInterrupt once it has unwound.

    Left to asyncio.run, Ctrl-C would cancel every task at once, aiortc's own among them,
    and closing a peer connection whose tasks never started can wait forever.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coroutine)

    def cancel(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(task.cancel)

    previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise KeyboardInterrupt


def run_benchmark(settings: SetupSettings, out: Path | None) -> dict[str, Any]:
    """Start what is needed, measure, stop everything (even on errors); returns the data."""
    progress = Progress(total=4)
    with contextlib.ExitStack() as stack, terminate_as_interrupt():
        if settings.target:
            voxrelay = target_server(settings.target)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voxrelay-")))
            fleet = TemporaryFleet(workdir, settings.transceivers, settings.workers)
            stack.callback(fleet.close)
            voxrelay = voxrelay_server(fleet.start(), "the temporary fleet")
        aiortc_process = AiortcEchoProcess()
        stack.callback(aiortc_process.close)
        servers = {"voxrelay": voxrelay, "aiortc": aiortc_process.server()}
        click.echo(
            f"voxrelay at {voxrelay.whip_url} (pids {voxrelay.processes or 'not local'}), "
            f"aiortc echo server at {servers['aiortc'].whip_url} (pid {aiortc_process.process.pid})"
        )
        setup, steady = asyncio.run(interruptible(measure(servers, settings, progress)))
    data = build_report(settings, servers, setup, steady)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "setup.json").write_text(json.dumps(data, indent=2) + "\n")
        plot_report(data, out / "setup.png")
    return data


@click.command("setup")
@click.option(
    "--calls",
    default=20,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Calls whose setup is timed, per server.",
)
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Calls set up at once per server (each hangs up at its first echo, the next dials; "
    "the servers take turns).",
)
@click.option("--burst", is_flag=True, help="Dial all --calls at once instead.")
@click.option(
    "--steady-calls",
    default=None,
    type=click.IntRange(1, 10_000),
    help="Calls held during the CPU phase  [default: --calls]",
)
@click.option(
    "--duration",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.5, 3600),
    help="Seconds of the CPU phase.",
)
@call_timeout_option
@click.option(
    "--prompt-ice",
    is_flag=True,
    help="Let the caller leave ICE when a pair is nominated, not at aioice's next 20 ms tick.",
)
@click.option(
    "--target",
    default=None,
    metavar="URL",
    help="A running fleet's status URL (or a transceiver's signaling URL) instead of a "
    "temporary fleet.",
)
@click.option("--token", default=None, help="WHIP bearer token (signaling_token) for --target.")
@temporary_fleet_options
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for setup.json and setup.png.",
)
def setup_bench_command(
    calls: int,
    concurrency: int,
    burst: bool,
    steady_calls: int | None,
    duration: float,
    call_timeout: float,
    prompt_ice: bool,
    target: str | None,
    token: str | None,
    transceivers: int,
    workers: int,
    out_dir: str | None,
) -> None:
    """Call setup time and echo CPU cost, voxrelay beside an aiortc echo server.

    An aiortc caller dials both over WHIP and times answer, ICE, DTLS connected and the
    first echoed RTP packet (median and p95, against the targets connected < 20 ms and
    first echo < 30 ms), then holds --steady-calls calls for --duration seconds and
    reports CPU µs per echoed packet of the transceivers, relay workers, aiortc server and
    caller. Without --target, a temporary fleet is started and stopped.
    """
    settings = SetupSettings(
        calls=calls,
        concurrency=min(concurrency, calls),
        burst=burst,
        steady_calls=steady_calls or calls,
        duration=duration,
        call_timeout=call_timeout,
        prompt_ice=prompt_ice,
        bearer=token,
        target=target,
        transceivers=transceivers,
        workers=workers,
    )
    out = Path(out_dir) if out_dir else None
    data = run_reporting_errors(lambda: run_benchmark(settings, out), (BenchError, PlotError))
    click.echo(render_table(data))
    if out is not None:
        click.echo(f"wrote {out / 'setup.json'} and {out / 'setup.png'}")


if __name__ == "__main__":
    if sys.argv[1:] == ["aiortc-echo-server"]:
        serve_aiortc_echo()
    else:
        sys.exit("usage: python -m voxrelay.bench.setup_bench aiortc-echo-server")
