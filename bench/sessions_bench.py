"""``voxrelay bench sessions``: whole calls under load, voxrelay beside aiortc in one run.

Callers (bench/callers.py: sans-IO ICE, DTLS and SRTP, hundreds of calls per process, a
few processes) dial a voxrelay fleet over WHIP - a temporary one started with ``voxrelay up
--detach``, or a running one with ``--target`` - and, with ``--baseline``, aiortc echo
servers started by the benchmark, in the same run. Each call does the offer/answer, ICE
checks, a DTLS handshake, then sends ~80-byte Opus packets at 50 packets/s and receives the
echo. What is measured, per server:

- setup: offer POST -> answer -> ICE check answered -> DTLS connected (SRTP keyed) -> first
  echoed packet; at idle (``--idle-calls`` one after another), under load (the calls each
  step adds while the earlier ones talk) and all at once (``--herd-calls``).
- steps (``--calls``, ramped at ``--ramp-rate``): for ``--duration`` s at each call count,
  round trip p50/p99 (from the send time the caller writes into each payload), loss and
  reordering (the caller's sequence numbers), CPU time (user + system, psutil) and
  proportional set size (PSS: resident memory, each shared page divided among the processes
  that map it) of each of the server's process groups, and of the callers, reported apart.
- capacity: the most calls with p99 round trip under ``--rtt-p99-ms`` and loss under
  ``--max-loss``, narrowed by bisection between the steps (``--search-steps``); reported as
  calls per fleet core (the cores the fleet used there). A server whose round trip already
  fails at the smallest step for a fixed hold (aiortc's jitter buffer), not for load, has
  no capacity within the limit and is not searched; its CPU-bound calls per core are still
  reported, and its CPU and memory per call still compared (the ramp stops on loss only).
- cost: CPU per call as infrastructure cost per 1,000 call-minutes at ``--vcpu-hour-usd``.
- soak (``--soak SECONDS``): ``--soak-calls`` held for that long, the fleet's PSS sampled over
  time, to show that memory does not grow at constant load.

Modes: ``passthrough`` (voxrelay's in-process echo backend, which returns each RTP payload
unchanged) and ``pcm`` (the transceiver decodes Opus to PCM for an out-of-process WebSocket
echo backend, ``voxrelay backend echo``, and encodes its PCM back to Opus). A transcoded
echo does not carry the caller's send time, so in pcm mode round trips are not measured and
"loss" is the echo deficit: 1 - packets received / packets sent in the window.

Baselines (``--baseline aiortc``, ``aiortc-tap`` or both, comma-separated), each an aiortc
1.16 server in a process of its own, answering WHIP on loopback:

- ``aiortc`` in passthrough mode (report name "aiortc", the target's baseline): aiortc's
  whole receive and send pipeline - SRTP, RTCRtpReceiver (RTCP, jitter buffer, decoder
  thread), the received track added back as the sent track, RTCRtpSender, SRTP - with the
  Opus decoder swapped for one that hands each encoded frame on as an ``av.Packet``, which
  the sender packs unchanged: aiortc patched to pass encoded frames through, no
  transcoding. The jitter buffer holds each echo ~80 ms. In pcm mode ("aiortc-stock"):
  stock aiortc echoing the received track, decoding and re-encoding Opus.
- ``aiortc-tap`` (passthrough only, a reference): a lean server that takes each RTP packet
  right after SRTP and sends its payload back as a pre-encoded packet, skipping the
  receiver, jitter buffer and decoder thread - less than any real aiortc application does.

The relay alone (no DTLS, no SRTP) is measured by ``voxrelay bench relay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import psutil

from voxrelay.bench.callers import histogram_percentile
from voxrelay.bench.common import (
    BenchError,
    call_timeout_option,
    fmt,
    ratio_of,
    report_header,
    run_reporting_errors,
    temporary_fleet_options,
    terminate_as_interrupt,
)
from voxrelay.bench.plot import PlotError, colour_for, grouped_bars, pyplot, save_figure
from voxrelay.bench.setup_bench import (
    OPUS_TIME_BASE,
    AiortcEchoApp,
    AiortcEchoProcess,
    TemporaryFleet,
    fetch_status,
    interruptible,
    percentile,
    serve_echo_app,
    voxrelay_server,
)

MODES = ("passthrough", "pcm")
MILESTONES = ("answer", "ice", "connected", "first_echo")
MILESTONE_LABELS = {
    "answer": "answer",
    "ice": "ICE check answered",
    "connected": "DTLS connected",
    "first_echo": "first echo",
}
PHASES = ("idle", "load", "herd")
SCHEMA_VERSION = 2  # 2: "aiortc" in passthrough is the receiver pipeline, was the RTP tap
BASELINES = ("aiortc", "aiortc-tap")  # what --baseline takes (besides "none")
AIORTC_ECHO_HOLD_MS = 80.0  # aiortc 1.16's audio JitterBuffer(prefetch=4) x 20 ms packets
TARGET_PASSTHROUGH_CPU_RATIO = 5.0  # aiortc passthrough / voxrelay, CPU per call: at least
TARGET_TRANSCODING_CPU_RATIO = 3.0  # stock aiortc / voxrelay pcm: at least
TARGET_MEMORY_RATIO = 0.2  # voxrelay / aiortc, PSS per call: at most
SATURATED_LOSS = 0.05  # a step losing more stops the ramp for that server
SATURATED_FAILURES = 0.1  # ... as does a step whose new calls fail this often
SATURATED_PROCESS_CORES = 0.9  # a process this busy (of one core) is taken as saturated
START_DELAY_S = 0.2  # a window starts this long after it is announced to every caller
GRACE_S = 0.5  # echoes of a window's packets still count this long after it
SETTLE_S = 1.0  # between a ramp and its window
STATUS_TIMEOUT_S = 30.0


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionsSettings:
    calls: tuple[int, ...]
    pcm_calls: tuple[int, ...]
    duration: float
    baselines: tuple[str, ...]
    """Of BASELINES, in that order; empty for none."""
    modes: tuple[str, ...]
    target: str | None
    token: str | None
    caller_processes: int
    ramp_rate: float
    idle_calls: int
    herd_calls: int | None
    rtt_p99_ms: float
    max_loss: float
    search_steps: int
    soak: float
    soak_calls: int
    soak_interval: float
    call_timeout: float
    vcpu_hour_usd: float
    transceivers: int
    workers: int

    def steps(self, mode: str) -> tuple[int, ...]:
        """The call counts to step through in ``mode`` (transcoding costs more per call)."""
        return self.pcm_calls if mode == "pcm" else self.calls

    def herd(self, mode: str) -> int:
        return self.steps(mode)[0] if self.herd_calls is None else self.herd_calls

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": list(self.calls),
            "pcm_calls": list(self.pcm_calls),
            "duration_s": self.duration,
            "baseline": ",".join(self.baselines) or None,
            "baselines": list(self.baselines),
            "modes": list(self.modes),
            "target": self.target,
            "caller_processes": self.caller_processes,
            "ramp_rate_per_s": self.ramp_rate,
            "idle_calls": self.idle_calls,
            "herd_calls": self.herd_calls,  # None: each mode's first step
            "rtt_p99_ms_max": self.rtt_p99_ms,
            "max_loss": self.max_loss,
            "search_steps": self.search_steps,
            "soak_s": self.soak,
            "soak_calls": self.soak_calls,
            "soak_interval_s": self.soak_interval,
            "call_timeout_s": self.call_timeout,
            "vcpu_hour_usd": self.vcpu_hour_usd,
            "transceivers": None if self.target else self.transceivers,
            "relay_workers": None if self.target else self.workers,
            "packets_per_second_per_call": 50,
        }


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A progress bar per phase: tqdm when installed, else click's (on stderr either way)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        try:
            import tqdm
        except ImportError:
            self._tqdm: Any = None
        else:
            self._tqdm = tqdm.tqdm

    @contextlib.contextmanager
    def bar(self, total: float, description: str, unit: str = "") -> Iterator[_Bar]:
        bar = _Bar(self, total, description, unit)
        try:
            yield bar
        finally:
            bar.close()

    def note(self, text: str) -> None:
        click.echo(text, err=True)


class _Bar:
    def __init__(self, progress: Progress, total: float, description: str, unit: str) -> None:
        self.done = 0.0
        self._total = total
        self._postfix = ""
        self._tqdm = self._click = None
        if not progress.enabled:
            return
        if progress._tqdm is not None:
            self._tqdm = progress._tqdm(
                total=total,
                desc=description,
                unit=unit or "it",
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}{unit} "
                "[{elapsed}<{remaining}]{postfix}",
            )
        else:
            self._click = click.progressbar(
                length=max(1, int(total)),
                label=description,
                file=sys.stderr,
                item_show_func=lambda _: self._postfix or None,
            )
            self._click.__enter__()

    def set(self, value: float, postfix: str = "") -> None:
        value = min(value, self._total)
        previous, self.done = self.done, value
        self._postfix = postfix
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(value - previous)
        elif self._click is not None:  # whole units only
            self._click.update(int(value) - int(previous), postfix)

    def advance(self, amount: float = 1, postfix: str = "") -> None:
        self.set(self.done + amount, postfix)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._click is not None:
            self._click.__exit__(None, None, None)


# -- the servers under test -----------------------------------------------------------------


@dataclass
class System:
    """A WHIP echo server under test and the local processes whose CPU and memory it costs."""

    name: str
    mode: str
    whip_url: str
    processes: dict[str, list[int]]
    """Group -> pids: transceiver, relay, supervisor, backend (voxrelay); server (aiortc)."""
    like_for_like: str | None
    """The group that does what an aiortc server does (ICE, DTLS, SRTP, echo)."""
    transcodes: bool
    echo: str
    is_baseline: bool = False
    baseline_role: str | None = None
    """A baseline's part in the comparisons: "target" (the verdict is against it) or
    "reference" (compared for information, no verdict)."""
    echo_hold_ms: float | None = None
    """A fixed time the server holds every echo (a jitter buffer), whatever the load."""
    bearer: str | None = None
    description: dict[str, Any] = field(default_factory=dict)
    _handles: dict[int, psutil.Process] = field(default_factory=dict, repr=False)

    @property
    def echo_keeps_payload(self) -> bool:
        return not self.transcodes

    def _process(self, pid: int) -> psutil.Process:
        handle = self._handles.get(pid)
        if handle is None:
            handle = self._handles[pid] = psutil.Process(pid)
        return handle

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) of each group so far."""
        result = {}
        for group, pids in self.processes.items():
            total = 0.0
            for pid in pids:
                try:
                    times = self._process(pid).cpu_times()
                except psutil.Error as exc:
                    raise BenchError(f"{self.name}: {group} pid {pid} is gone ({exc})") from exc
                total += times.user + times.system
            result[group] = total
        return result

    def pss(self) -> dict[str, int]:
        """Proportional set size of each group now, in bytes (see ``process_memory``)."""
        result = {}
        for group, pids in self.processes.items():
            total = 0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += process_memory(self._process(pid))
            result[group] = total
        return result

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "whip_url": self.whip_url,
            "pids": self.processes,
            "like_for_like_group": self.like_for_like,
            "transcodes": self.transcodes,
            "echo": self.echo,
            "is_baseline": self.is_baseline,
            "baseline_role": self.baseline_role,
            "echo_hold_ms": self.echo_hold_ms,
            **self.description,
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EchoBackendProcess:
    """``voxrelay backend echo`` on a free loopback port: the pcm mode's backend."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.port = _free_port()
        self.url = f"ws://127.0.0.1:{self.port}/call"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "voxrelay", "backend", "echo", "--port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C is the benchmark's to handle
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the echo backend exited with status {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.05)
        self.close()
        raise BenchError(
            f"the echo backend did not listen on port {self.port} within {timeout:g} s"
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class PcmFleet(TemporaryFleet):
    """A temporary fleet whose transceivers send PCM to a WebSocket backend."""

    def __init__(self, workdir: Path, transceivers: int, workers: int, backend_url: str) -> None:
        super().__init__(workdir, transceivers, workers)
        with self.config_path.open("a") as config:
            config.write(f'[backend]\nkind = "websocket"\nurl = "{backend_url}"\ncodec = "pcm16"\n')


AIORTC_SERVER_KINDS = ("receiver", "tap", "transcoding")  # see serve_aiortc


@dataclass(frozen=True)
class AiortcBaseline:
    """An aiortc server the benchmark can run beside voxrelay, and what it does."""

    name: str
    """In the report."""
    option: str
    """In --baseline."""
    kind: str
    """Of AIORTC_SERVER_KINDS: the server process's argument."""
    mode: str
    role: str
    """Either "target" (the verdict is against it) or "reference" (compared, no verdict)."""
    transcodes: bool
    echo: str
    echo_short: str
    """For the Markdown table's echo column."""
    echo_hold_ms: float | None


AIORTC_BASELINES = (
    AiortcBaseline(
        name="aiortc",
        option="aiortc",
        kind="receiver",
        mode="passthrough",
        role="target",
        transcodes=False,
        echo="aiortc's whole pipeline, Opus passed through: SRTP, RTCRtpReceiver (RTCP, "
        "jitter buffer, decoder thread, its Opus decoder swapped for one handing each "
        "encoded frame on as an av.Packet), the received track added back as the sent "
        "track, RTCRtpSender packing each packet unchanged, SRTP (no transcoding)",
        echo_short="passthrough, through RTCRtpReceiver and its jitter buffer",
        echo_hold_ms=AIORTC_ECHO_HOLD_MS,
    ),
    AiortcBaseline(
        name="aiortc-tap",
        option="aiortc-tap",
        kind="tap",
        mode="passthrough",
        role="reference",
        transcodes=False,
        echo="lean aiortc: each RTP packet taken right after SRTP (RTCDtlsTransport."
        "_handle_rtp_data replaced) and its payload sent back by RTCRtpSender as a "
        "pre-encoded packet (no RTCRtpReceiver, jitter buffer, decoder thread or encoder; "
        "no transcoding)",
        echo_short="passthrough, RTP tapped after SRTP (reference)",
        echo_hold_ms=None,
    ),
    AiortcBaseline(
        name="aiortc-stock",
        option="aiortc",
        kind="transcoding",
        mode="pcm",
        role="target",
        transcodes=True,
        echo="stock aiortc: the received track added back as the sent track (jitter "
        "buffer, Opus decode, Opus encode: transcodes)",
        echo_short="transcodes (stock aiortc)",
        echo_hold_ms=AIORTC_ECHO_HOLD_MS,
    ),
)


def aiortc_baselines(options: Sequence[str], mode: str) -> list[AiortcBaseline]:
    """The servers ``--baseline`` asks for in ``mode``, the target's first."""
    return [b for b in AIORTC_BASELINES if b.mode == mode and b.option in options]


class AiortcServerProcess(AiortcEchoProcess):
    """An aiortc echo server of ``kind`` (AIORTC_SERVER_KINDS), on loopback only."""

    def __init__(self, kind: str, timeout: float = 30.0) -> None:
        if kind not in AIORTC_SERVER_KINDS:
            raise ValueError(f"no aiortc server kind {kind!r}")
        self.kind = kind
        self._spawn(["voxrelay.bench.sessions_bench", "aiortc-server", kind], timeout)


def voxrelay_system(status: dict[str, Any], source: str, mode: str, bearer: str | None) -> System:
    server = voxrelay_server(status, source)
    processes = dict(server.processes)
    if processes and status.get("pid") and "local_transceivers" in status:
        processes["supervisor"] = [int(status["pid"])]
    return System(
        name="voxrelay" if mode == "passthrough" else "voxrelay-pcm",
        mode=mode,
        whip_url=server.whip_url,
        processes=processes,
        like_for_like="transceiver" if "transceiver" in processes else None,
        transcodes=mode == "pcm",
        echo=(
            "in-process echo backend: RTP payloads back unchanged (no transcoding)"
            if mode == "passthrough"
            else "transceiver decodes Opus to 16 kHz PCM for `voxrelay backend echo` over "
            "WebSocket and encodes its PCM back to Opus (transcodes)"
        ),
        bearer=bearer,
        description=server.description,
    )


def aiortc_system(baseline: AiortcBaseline, whip_url: str, pid: int) -> System:
    """The System of ``baseline``'s server process ``pid``, answering at ``whip_url``."""
    import aiortc

    return System(
        name=baseline.name,
        mode=baseline.mode,
        whip_url=whip_url,
        processes={"server": [pid]},
        like_for_like="server",
        transcodes=baseline.transcodes,
        echo=baseline.echo,
        is_baseline=True,
        baseline_role=baseline.role,
        echo_hold_ms=baseline.echo_hold_ms,
        description={
            "kind": "aiortc echo server",
            "server_kind": baseline.kind,
            "echo_short": baseline.echo_short,
            "aiortc": aiortc.__version__,
        },
    )


# -- the aiortc servers (run in a process of their own) -------------------------------------


class TranscodingEchoApp(AiortcEchoApp):
    """Stock aiortc echo: the caller's track, decoded, is what the server sends (re-encoded)."""

    offer_errors = (ValueError, AttributeError, IndexError)

    def add_echo_track(self, pc: Any) -> None:
        pc.addTrack(pc.getTransceivers()[0].receiver.track)

    def start_echo(self, pc: Any, echo: Any) -> None:
        """Nothing to start: aiortc's receiver feeds the track it sends."""


class PassthroughOpusDecoder:
    """aiortc's Decoder interface, decoding nothing: each encoded frame (a JitterFrame) on
    as an ``av.Packet`` with its bytes, pts = its RTP timestamp (which RTCRtpReceiver has
    mapped to start at 0) and time base 1/48000. RTCRtpSender packs what is not an
    ``av.Frame`` with the encoder's ``pack``, which for Opus sends ``bytes(packet)`` at
    that pts: the payload goes out as it came in."""

    frames = 0
    """Frames passed through, all decoders of the process (the /status endpoint)."""
    _lock = threading.Lock()

    def __init__(self) -> None:
        import av

        self._packet = av.Packet

    def decode(self, encoded_frame: Any) -> list[Any]:
        packet = self._packet(encoded_frame.data)
        packet.pts = encoded_frame.timestamp
        packet.time_base = OPUS_TIME_BASE
        with self._lock:  # one decoder thread per call: they race for the count only
            PassthroughOpusDecoder.frames += 1
        return [packet]


def pass_opus_through() -> None:
    """Make every RTCRtpReceiver of this process hand Opus frames on undecoded.

    aiortc 1.16's receiver runs ``decoder_worker`` in a thread per receiver, which calls the
    module-level ``aiortc.rtcrtpreceiver.get_decoder(codec)`` and then
    ``decoder.decode(encoded_frame)``; this replaces that module global, process-wide, so
    it is called only in the aiortc server's own process (``serve_aiortc("receiver")``).
    The rest of the pipeline - RTCP, the jitter buffer, the thread hop, the track, the
    sender - is aiortc's, unchanged.
    """
    import aiortc.rtcrtpreceiver as receiver_module

    stock = getattr(receiver_module, "get_decoder", None)
    if not callable(stock) or not callable(getattr(receiver_module, "decoder_worker", None)):
        raise BenchError("this aiortc has no rtcrtpreceiver.get_decoder to pass Opus through")

    def get_decoder(codec: Any) -> Any:
        if codec.mimeType.lower() == "audio/opus":
            return PassthroughOpusDecoder()
        return stock(codec)

    receiver_module.get_decoder = get_decoder


class ReceiverEchoApp(TranscodingEchoApp):
    """aiortc's pipeline echoing the received track, with :func:`pass_opus_through` in
    force: Opus frames go through RTCRtpReceiver and RTCRtpSender undecoded."""

    async def status(self, request: Any) -> Any:
        from aiohttp import web

        response = await super().status(request)
        view = json.loads(response.text)
        view["frames_passed_through"] = PassthroughOpusDecoder.frames
        return web.json_response(view)


def serve_aiortc(kind: str, host: str = "127.0.0.1") -> None:
    """Serve until SIGTERM or end of stdin; print ``{"whip_url", "pid"}`` once listening.

    ``kind``: "receiver" (:class:`ReceiverEchoApp`; patches aiortc in this process, see
    :func:`pass_opus_through`), "tap" (setup_bench's AiortcEchoApp: RTP tapped after
    SRTP) or "transcoding" (:class:`TranscodingEchoApp`, stock aiortc). It gathers
    ``host`` only (see :func:`serve_echo_app`).
    """
    apps: dict[str, Callable[[], AiortcEchoApp]] = {
        "receiver": ReceiverEchoApp,
        "tap": AiortcEchoApp,
        "transcoding": TranscodingEchoApp,
    }
    if kind == "receiver":
        pass_opus_through()

    serve_echo_app(apps[kind], host, backlog=1024)


# -- the caller processes -------------------------------------------------------------------


class CallerPool:
    """The caller processes (bench/callers.py), driven with JSON lines over pipes."""

    def __init__(self, count: int, log_path: Path) -> None:
        self.count = count
        self.log_path = log_path
        self.processes: list[asyncio.subprocess.Process] = []
        self._handles: dict[int, psutil.Process] = {}
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._readers: list[asyncio.Task] = []
        self._next_id = 0
        self.on_dialed: Callable[[bool], None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        try:
            for _ in range(self.count):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "voxrelay.bench.callers",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    limit=1 << 24,
                    start_new_session=True,
                )
                self.processes.append(process)
                assert process.stdout is not None
                line = await asyncio.wait_for(process.stdout.readline(), timeout)
                if not line:
                    raise BenchError(f"a caller process failed to start:\n{self.log_tail()}")
                self._readers.append(asyncio.ensure_future(self._read(process)))
        finally:
            log.close()

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            message = json.loads(line)
            if "reply" in message:
                waiter = self._waiting.pop(message["reply"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            elif message.get("event") == "dialed" and self.on_dialed is not None:
                self.on_dialed(bool(message.get("ok")))
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(
                    BenchError(f"caller process {process.pid} exited:\n{self.log_tail()}")
                )

    async def request(self, index: int, command: str, **arguments: Any) -> dict[str, Any]:
        process = self.processes[index]
        ident = self._next_id = self._next_id + 1
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        assert process.stdin is not None
        process.stdin.write(json.dumps({"id": ident, "cmd": command, **arguments}).encode() + b"\n")
        await process.stdin.drain()
        reply = await waiter
        if reply.get("error"):
            raise BenchError(f"caller process {process.pid}: {command}: {reply['error']}")
        return reply

    async def each(self, command: str, arguments: Sequence[dict[str, Any]]) -> list[dict]:
        return list(
            await asyncio.gather(
                *(self.request(i, command, **arguments[i]) for i in range(self.count))
            )
        )

    async def status(self) -> list[dict[str, Any]]:
        return await asyncio.wait_for(self.each("status", [{}] * self.count), STATUS_TIMEOUT_S)

    async def live(self) -> list[int]:
        return [row["live"] for row in await self.status()]

    async def dial(
        self, system: System, count: int, rate: float, tag: str, timeout: float
    ) -> list[dict[str, Any]]:
        """Dial ``count`` calls spread over the processes at ``rate`` per second in all."""
        shares = _split(count, self.count)
        arguments = [
            {
                "url": system.whip_url,
                "count": share,
                "rate": rate * share / count if rate > 0 and count else 0,
                "tag": tag,
                "timeout": timeout,
                "token": system.bearer,
            }
            for share in shares
        ]
        replies = await self.each("dial", arguments)
        return [record for reply in replies for record in reply["calls"]]

    async def hang_up(self, count: int | None = None) -> None:
        """Hang up ``count`` calls (all with None), taken from the busiest processes."""
        if count is None:
            await self.each("hangup", [{"count": None}] * self.count)
            return
        live = await self.live()
        shares = [0] * self.count
        for _ in range(min(count, sum(live))):
            busiest = max(range(self.count), key=lambda i: live[i] - shares[i])
            shares[busiest] += 1
        await self.each("hangup", [{"count": share} for share in shares])

    async def measure(self, start_ns: int, end_ns: int, grace: float) -> list[dict[str, Any]]:
        arguments = {"start_ns": start_ns, "end_ns": end_ns, "grace": grace}
        return await self.each("measure", [arguments] * self.count)

    def cpu(self) -> list[float]:
        result = []
        for pid in self.pids:
            handle = self._handles.get(pid)
            if handle is None:
                handle = self._handles[pid] = psutil.Process(pid)
            try:
                times = handle.cpu_times()
            except psutil.Error as exc:
                raise BenchError(f"caller process {pid} is gone:\n{self.log_tail()}") from exc
            result.append(times.user + times.system)
        return result

    def pss(self) -> int:
        total = 0
        for handle in self._handles.values():
            with contextlib.suppress(psutil.Error):
                total += process_memory(handle)
        return total

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None and process.stdin is not None:
                with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                    process.stdin.write(b'{"cmd": "exit"}\n')
                    await process.stdin.drain()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for reader in self._readers:
            reader.cancel()
        self.processes = []


def _waiting_ns(pids: Sequence[int]) -> int | None:
    """Nanoseconds the processes spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as stat:
                total += int(stat.read().split()[1])
        except (OSError, IndexError, ValueError):
            return None
    return total


def _pressure_ns() -> int | None:
    """The machine's CPU pressure stall time ("some", /proc/pressure/cpu), in ns."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            for line in pressure:
                if line.startswith("some "):
                    fields = dict(item.split("=") for item in line.split()[1:])
                    return int(fields["total"]) * 1000
    except (OSError, ValueError, KeyError):
        return None
    return None


def _contention(system: System, pool: CallerPool) -> dict[str, int | None]:
    """Counters of waiting for a CPU: a noisy machine shows here, not only in the results."""
    return {
        "server_wait_cores": _waiting_ns([p for pids in system.processes.values() for p in pids]),
        "callers_wait_cores": _waiting_ns(pool.pids),
        "machine_cpu_pressure": _pressure_ns(),
    }


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- statistics -----------------------------------------------------------------------------


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize_setup(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/p99 of each milestone (ms after the offer POST) over the calls that echoed."""
    good = [record for record in records if record["ok"]]
    milestones = {}
    for name in MILESTONES:
        values = [r["ms"][name] for r in good if r["ms"].get(name) is not None]
        milestones[name] = {
            "n": len(values),
            "p50": _round(percentile(values, 0.50)),
            "p95": _round(percentile(values, 0.95)),
            "p99": _round(percentile(values, 0.99)),
            "max": _round(max(values, default=None)),
        }
    errors: dict[str, int] = {}
    for record in records:
        if not record["ok"]:
            errors[record["error"] or "unknown"] = errors.get(record["error"] or "unknown", 0) + 1
    return {
        "calls": len(records),
        "ok": len(good),
        "failed": len(records) - len(good),
        "errors": errors,
        "milestones_ms": milestones,
    }


def merge_windows(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One window from every caller process's counters and RTT histograms."""
    windows = [reply["window"] for reply in replies]
    histogram: dict[int, int] = {}
    for window in windows:
        for bucket, count in window["rtt_histogram"].items():
            histogram[int(bucket)] = histogram.get(int(bucket), 0) + count
    totals = {
        key: sum(w[key] for w in windows)
        for key in ("sent", "echoed", "reordered", "foreign", "late_ticks")
    }
    echoed = totals["echoed"]
    minimums = [w["rtt_min_ns"] for w in windows if w["rtt_min_ns"] is not None]
    rtt = None
    if echoed:
        rtt = {
            "p50": _round(histogram_percentile(histogram, 0.50) / 1000),
            "p95": _round(histogram_percentile(histogram, 0.95) / 1000),
            "p99": _round(histogram_percentile(histogram, 0.99) / 1000),
            "mean": _round(sum(w["rtt_sum_ns"] for w in windows) / echoed / 1e6),
            "min": _round(min(minimums) / 1e6) if minimums else None,
            "max": _round(max(w["rtt_max_ns"] for w in windows) / 1e6),
        }
    return {**totals, "rtt_ms": rtt, "live": sum(reply["live"] for reply in replies)}


def process_memory(process: psutil.Process) -> int:
    """The process's proportional set size (PSS) in bytes, or its RSS where the platform
    has no PSS.

    RSS would count the relay's shared routing table once per worker that touched it (the
    kernel maps neighbouring resident pages on a fault, so a worker's RSS grows by several
    table pages per route it inserts): a front-loaded, bounded cost that would read as
    memory per call. PSS splits each shared page among the processes that map it, so a
    fleet's sum counts the table once.
    """
    pss = getattr(process.memory_full_info(), "pss", None)
    return pss if pss is not None else process.memory_info().rss


def linear_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den


# -- one server's series --------------------------------------------------------------------


class Series:
    """Everything measured against one server: setup phases, steps, capacity, soak."""

    def __init__(
        self, system: System, pool: CallerPool, settings: SessionsSettings, progress: Progress
    ) -> None:
        self.system = system
        self.pool = pool
        self.settings = settings
        self.progress = progress
        self.setup_records: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        self.steps: list[dict[str, Any]] = []
        self.search: list[dict[str, Any]] = []
        self.baseline_pss: dict[str, int] = {}
        self.soak: dict[str, Any] | None = None
        self.stopped: str | None = None
        self.search_note: str | None = None

    # ------------------------------------------------------------------ helpers

    async def _dial(self, count: int, rate: float, tag: str, phase: str | None) -> list[dict]:
        name = self.system.name
        label = {"idle": "idle", "herd": "herd", None: "warm-up"}.get(phase, f"ramp to {tag}")
        with self.progress.bar(count, f"{name}: {label}", " calls") as bar:
            failed = 0

            def dialed(ok: bool) -> None:
                nonlocal failed
                failed += not ok
                bar.advance(1, f"{failed} failed" if failed else "")

            self.pool.on_dialed = dialed
            try:
                records = await self.pool.dial(
                    self.system, count, rate, tag, self.settings.call_timeout
                )
            finally:
                self.pool.on_dialed = None
        for record in records:
            record["calls_before"] = tag
        if phase is not None:
            self.setup_records[phase].extend(records)
        return records

    def _refusals(self, step: dict[str, Any]) -> list[str]:
        """Which capacity criteria ``step`` misses (none: accepted): "calls" (not every
        call up), "loss", "rtt" (p99 round trip) or "busy" (a transcoding server's
        process saturated: its echo carries no send time to time)."""
        refusals = []
        if step["live"] < step["calls"]:
            refusals.append("calls")
        if step["loss"] is None or step["loss"] >= self.settings.max_loss:
            refusals.append("loss")
        rtt = step["rtt_ms"]
        if self.system.echo_keeps_payload:
            if rtt is None or rtt["p99"] >= self.settings.rtt_p99_ms:
                refusals.append("rtt")
        elif (step["busiest_process_cores"] or 0) >= SATURATED_PROCESS_CORES:
            # A process busy for most of a core stands in for the round trip (it is
            # queueing, and its latency grows).
            refusals.append("busy")
        return refusals

    async def _window(self, calls: int, duration: float, label: str) -> dict[str, Any]:
        """One measurement window of ``duration`` s with ``calls`` calls up."""
        system, pool = self.system, self.pool
        start_ns = time.time_ns() + int(START_DELAY_S * 1e9)
        end_ns = start_ns + int(duration * 1e9)
        replies = asyncio.ensure_future(pool.measure(start_ns, end_ns, GRACE_S))
        await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
        cpu_before, callers_before = system.cpu(), pool.cpu()
        waits_before = _contention(system, pool)
        started = time.perf_counter()
        with self.progress.bar(duration, f"{system.name}: {label}", " s") as bar:
            last = (cpu_before, callers_before, started)
            while (remaining := (end_ns - time.time_ns()) / 1e9) > 0:
                await asyncio.sleep(min(0.5, remaining))
                cpu_now, callers_now, now = system.cpu(), pool.cpu(), time.perf_counter()
                span = max(now - last[2], 1e-6)
                server = sum(cpu_now.values()) - sum(last[0].values())
                callers = sum(callers_now) - sum(last[1])
                bar.set(
                    min(duration, now - started),
                    f"{system.name} {server / span:.2f} cores, callers {callers / span:.2f}",
                )
                last = (cpu_now, callers_now, now)
        cpu_after, callers_after = system.cpu(), pool.cpu()
        elapsed = time.perf_counter() - started
        waits_after = _contention(system, pool)
        pss = system.pss()
        callers_pss = pool.pss()
        merged = merge_windows(await replies)
        step = self._step(
            calls,
            elapsed,
            merged,
            cpu_before,
            cpu_after,
            callers_before,
            callers_after,
            pss,
            callers_pss,
        )
        step["contention"] = {
            key: (
                None
                if waits_before[key] is None or waits_after[key] is None
                else round((waits_after[key] - waits_before[key]) / 1e9 / elapsed, 4)
            )
            for key in waits_before
        }
        step["load_average_1m"] = os.getloadavg()[0]
        return step

    def _step(
        self,
        calls: int,
        elapsed: float,
        merged: dict[str, Any],
        cpu_before: dict[str, float],
        cpu_after: dict[str, float],
        callers_before: list[float],
        callers_after: list[float],
        pss: dict[str, int],
        callers_pss: int,
    ) -> dict[str, Any]:
        system = self.system
        cores = {group: (cpu_after[group] - cpu_before[group]) / elapsed for group in cpu_after}
        caller_cores = [
            (b - a) / elapsed for a, b in zip(callers_before, callers_after, strict=True)
        ]
        server_cores = sum(cores.values()) if cores else None
        busiest = max(
            (value / len(system.processes[group]) for group, value in cores.items()),
            default=None,
        )
        callers_total = sum(caller_cores)
        sent = merged["sent"]
        received = merged["echoed"] if system.echo_keeps_payload else merged["foreign"]
        loss = max(0.0, 1 - received / sent) if sent else None
        live = merged["live"]
        per_call = {group: value * 1000 / live if live else None for group, value in cores.items()}
        pss_per_call = {}
        for group, value in pss.items():
            base = self.baseline_pss.get(group)
            pss_per_call[group] = (
                (value - base) / live / 1024 if base is not None and live else None
            )
        step = {
            "calls": calls,
            "live": live,
            "elapsed_s": round(elapsed, 3),
            "sent": sent,
            "received": received,
            "echoes_intact": merged["echoed"],
            "echoes_transcoded": merged["foreign"],
            "loss": loss,
            "reordered": merged["reordered"],
            "rtt_ms": merged["rtt_ms"] if system.echo_keeps_payload else None,
            "late_caller_ticks": merged["late_ticks"],
            "cores": {group: round(value, 4) for group, value in cores.items()},
            "server_cores": None if server_cores is None else round(server_cores, 4),
            "busiest_process_cores": None if busiest is None else round(busiest, 4),
            "millicores_per_call": {group: _round(value) for group, value in per_call.items()},
            "server_millicores_per_call": (
                _round(server_cores * 1000 / live) if server_cores is not None and live else None
            ),
            "like_for_like_millicores_per_call": (
                per_call.get(system.like_for_like) if system.like_for_like else None
            ),
            "callers": {
                "cores": round(callers_total, 4),
                "cores_per_process": [round(value, 4) for value in caller_cores],
                "millicores_per_call": _round(callers_total * 1000 / live) if live else None,
                "share_of_all_cpu": (
                    _round(callers_total / (callers_total + server_cores), 4)
                    if server_cores
                    else None
                ),
                "pss_mb": round(callers_pss / 2**20, 1),
            },
            "pss_mb": {group: round(value / 2**20, 2) for group, value in pss.items()},
            "pss_kib_per_call": {group: _round(value, 1) for group, value in pss_per_call.items()},
        }
        step["refused_by"] = self._refusals(step)
        step["accepted"] = not step["refused_by"]
        return step

    async def _adjust(self, calls: int, tag: str, phase: str | None) -> int:
        """Bring the live calls to ``calls``: dial the missing ones, or hang up the extra."""
        live = sum(await self.pool.live())
        if live < calls:
            await self._dial(calls - live, self.settings.ramp_rate, tag, phase)
        elif live > calls:
            await self.pool.hang_up(live - calls)
        return sum(await self.pool.live())

    def _describe(self, step: dict[str, Any]) -> str:
        rtt = step["rtt_ms"]
        rtt_text = "rtt n/a (transcoded)" if rtt is None else f"rtt p50/p99 {rtt['p50']:.2f}/"
        if rtt is not None:
            rtt_text += f"{rtt['p99']:.2f} ms"
        return (
            f"{self.system.name} {step['calls']} calls ({step['live']} up): {rtt_text}, "
            f"loss {fmt(step['loss'], '.3%')}, server {fmt(step['server_cores'], '.2f')} "
            f"cores, callers {step['callers']['cores']:.2f} cores"
            + ("" if step["accepted"] else "  [over the limits]")
        )

    # ------------------------------------------------------------------ phases

    async def run(self, soak: bool) -> None:
        s = self.settings
        warmup = await self._dial(s.caller_processes, 0, "warm-up", None)
        failed = sorted({r["error"] for r in warmup if not r["ok"]})
        if failed:
            raise BenchError(f"{self.system.name}: the warm-up calls failed: {failed}")
        await self.pool.hang_up()
        await self._idle()
        await asyncio.sleep(SETTLE_S)
        self.baseline_pss = self.system.pss()
        for calls in s.steps(self.system.mode):
            before = sum(await self.pool.live())
            records = await self._dial(max(0, calls - before), s.ramp_rate, str(calls), "load")
            await asyncio.sleep(SETTLE_S)
            step = await self._window(calls, s.duration, f"{calls} calls")
            step["new_calls"] = len(records)
            step["failed_calls"] = sum(1 for r in records if not r["ok"])
            self.steps.append(step)
            self.progress.note(self._describe(step))
            too_lossy = (step["loss"] or 0) > SATURATED_LOSS
            too_many_failed = step["failed_calls"] > SATURATED_FAILURES * max(1, len(records))
            if too_lossy or too_many_failed:
                self.stopped = (
                    f"stopped after {calls} calls: saturated (loss {fmt(step['loss'], '.1%')}, "
                    f"{step['failed_calls']} of {len(records)} new calls failed)"
                )
                self.progress.note(f"{self.system.name}: {self.stopped}")
                break
        await self._search()
        if soak and s.soak > 0:
            await self._soak()
        await self.pool.hang_up()
        if s.herd(self.system.mode):
            await asyncio.sleep(SETTLE_S)
            await self._dial(s.herd(self.system.mode), 0, "herd", "herd")
            await self.pool.hang_up()

    async def _idle(self) -> None:
        """Calls one at a time on the otherwise idle server, each hung up before the next."""
        count = self.settings.idle_calls
        if not count:
            return
        with self.progress.bar(count, f"{self.system.name}: idle", " calls") as bar:
            for _ in range(count):
                records = await self.pool.dial(
                    self.system, 1, 0, "idle", self.settings.call_timeout
                )
                self.setup_records["idle"].extend(records)
                await self.pool.hang_up()
                bar.advance(1)

    async def _search(self) -> None:
        """Bisect between the largest accepted step and the next refused one.

        Not below the smallest step when it fails on round trip alone: that is a fixed
        hold (aiortc's jitter buffer), which fewer calls would not shorten.
        """
        accepted = [step["calls"] for step in self.steps if step["accepted"]]
        if not accepted:
            first = self.steps[0] if self.steps else None
            if first is None or not self.settings.search_steps:
                return
            if first["refused_by"] == ["rtt"]:
                hold = _hold_text(self.system.echo_hold_ms)
                self.search_note = (
                    f"not searched below {first['calls']} calls: there every call was up and "
                    f"loss within the limit, only the round trip failed (p99 "
                    f"{_p99_text(first)} >= {self.settings.rtt_p99_ms:g} ms), which fewer "
                    "calls would not shorten" + (f": {hold}" if hold else "")
                )
            else:
                self.search_note = (
                    f"not searched: the smallest step ({first['calls']} calls) already failed "
                    f"({', '.join(first['refused_by'])})"
                )
            self.progress.note(f"{self.system.name}: {self.search_note}")
            return
        low = max(accepted)
        refused = [
            step["calls"] for step in self.steps if not step["accepted"] and step["calls"] > low
        ]
        if not refused:
            return
        high = min(refused)
        for _ in range(self.settings.search_steps):
            if high - low <= max(2, low // 20):
                break
            middle = (low + high) // 2
            live = await self._adjust(middle, str(middle), "load")
            await asyncio.sleep(SETTLE_S)
            step = await self._window(middle, self.settings.duration, f"search {middle} calls")
            step["live_before"] = live
            self.search.append(step)
            self.progress.note(self._describe(step))
            if step["accepted"]:
                low = middle
            else:
                high = middle

    async def _soak(self) -> None:
        s = self.settings
        calls = s.soak_calls
        await self._adjust(calls, f"soak {calls}", None)
        await asyncio.sleep(SETTLE_S)
        # Back-to-back windows (at least two, for a trend), each closed by a PSS sample.
        windows = max(2, round(s.soak / s.soak_interval))
        interval = s.soak / windows
        samples = []
        started = time.monotonic()
        for index in range(windows):
            step = await self._window(calls, interval, f"soak {index + 1}/{windows}")
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 2),
                    "live": step["live"],
                    "pss_mb": step["pss_mb"],
                    "loss": step["loss"],
                    "rtt_p99_ms": (step["rtt_ms"] or {}).get("p99"),
                    "server_cores": step["server_cores"],
                }
            )
        totals = [(row["t_s"], sum(row["pss_mb"].values())) for row in samples]
        second_half = totals[len(totals) // 2 :]
        slope = linear_slope(totals)
        late_slope = linear_slope(second_half)
        self.soak = {
            "calls": calls,
            "duration_s": s.soak,
            "interval_s": interval,
            "samples": samples,
            "pss_mb_first": totals[0][1] if totals else None,
            "pss_mb_last": totals[-1][1] if totals else None,
            "pss_mb_per_10_min": _round(slope * 600, 2) if slope is not None else None,
            "pss_mb_per_10_min_second_half": (
                _round(late_slope * 600, 2) if late_slope is not None else None
            ),
        }

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        all_steps = sorted(self.steps + self.search, key=lambda step: step["calls"])
        accepted = [step for step in all_steps if step["accepted"]]
        refused_above = [
            step
            for step in all_steps
            if not step["accepted"] and (not accepted or step["calls"] > accepted[-1]["calls"])
        ]
        capacity = None
        if accepted:
            best = accepted[-1]
            fleet_cores = best["server_cores"]
            capacity = {
                "calls": best["calls"],
                "bounded": bool(refused_above),
                "note": (
                    f"the first refused count was {refused_above[0]['calls']}"
                    if refused_above
                    else "every count tried passed: capacity is at least this"
                ),
                "server_cores_used": fleet_cores,
                "calls_per_server_core": (
                    _round(best["calls"] / fleet_cores, 1) if fleet_cores else None
                ),
                "calls_per_core_cpu_bound": (
                    _round(1000 / best["server_millicores_per_call"], 1)
                    if best["server_millicores_per_call"]
                    else None
                ),
            }
        # Memory and marginal CPU only where the server kept up: a saturated one queues
        # work (its memory balloons) and cannot spend more CPU (its cost per call shrinks).
        # Memory also only from the ramp before its first saturated step: a process keeps
        # the heap a saturated step grew, so later (search) steps would report it too.
        kept_up = [step for step in all_steps if kept_up_with(step)]
        memory_steps = steps_for_memory(self.steps)
        capacity_note = (
            capacity["note"]
            if capacity
            else no_capacity_note(
                all_steps,
                self.settings.rtt_p99_ms,
                self.settings.max_loss,
                self.system.echo_hold_ms,
            )
        )
        pss_points = [(0.0, 0.0)] + [
            (step["live"], sum(step["pss_mb"].values()) - sum(self.baseline_pss.values()) / 2**20)
            for step in memory_steps
        ]
        like = self.system.like_for_like
        like_points = [(0.0, 0.0)] + [
            (step["live"], step["pss_mb"][like] - self.baseline_pss.get(like, 0) / 2**20)
            for step in memory_steps
            if like
        ]
        slope_all = linear_slope(pss_points)
        slope_like = linear_slope(like_points) if like else None
        marginal: dict[str, float | None] = {}
        for group in self.system.processes:
            slope = linear_slope([(step["live"], step["cores"][group]) for step in kept_up])
            marginal[group] = _round(slope * 1000) if slope is not None else None
        if self.system.processes:
            slope = linear_slope([(step["live"], step["server_cores"]) for step in kept_up])
            marginal["all"] = _round(slope * 1000) if slope is not None else None
        return {
            "system": self.system.as_dict(),
            "setup": {phase: summarize_setup(self.setup_records[phase]) for phase in PHASES},
            "setup_calls": self.setup_records,
            "steps": self.steps,
            "search": self.search,
            "stopped": self.stopped,
            "capacity": capacity,
            "capacity_note": capacity_note,
            "search_note": self.search_note,
            "cpu_bound": cpu_bound(all_steps),
            "marginal_millicores_per_call": marginal,
            "memory": {
                "baseline_pss_mb": {
                    group: round(value / 2**20, 2) for group, value in self.baseline_pss.items()
                },
                "kib_per_call_slope": _round(slope_all * 1024, 1) if slope_all else None,
                "like_for_like_kib_per_call_slope": (
                    _round(slope_like * 1024, 1) if slope_like else None
                ),
            },
            "soak": self.soak,
        }


def steps_for_memory(ramp: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ramp's steps up to its first the server did not keep up with: a process keeps
    the heap a saturated step grew, so every later step would report it too."""
    steps = []
    for step in ramp:
        if not kept_up_with(step):
            break
        steps.append(step)
    return steps


def _hold_text(hold_ms: float | None) -> str:
    return f"its jitter buffer holds each echo ~{hold_ms:g} ms" if hold_ms else ""


def _p99_text(step: dict[str, Any]) -> str:
    return f"{step['rtt_ms']['p99']:.0f} ms" if step["rtt_ms"] else "not measured"


def no_capacity_note(
    steps: Sequence[dict[str, Any]], rtt_limit: float, max_loss: float, hold_ms: float | None
) -> str:
    """Why no call count was within the limits, from the smallest step (sorted by calls)."""
    if not steps:
        return "no step was measured"
    first = steps[0]
    if first["refused_by"] == ["rtt"]:
        hold = _hold_text(hold_ms)
        return (
            f"none within p99 < {rtt_limit:g} ms"
            + (f" ({hold})" if hold else "")
            + f": p99 {_p99_text(first)} already at {first['calls']} calls, with every call "
            f"up and loss under {max_loss:.1%}"
        )
    return f"none of the counts tried ({', '.join(first['refused_by'])} at {first['calls']} calls)"


def cpu_bound(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Calls one core would carry at the CPU per call of the largest step the server kept
    up with (else the largest step), whatever its round trip: a server whose echo is held
    for a fixed time has no capacity under a round trip limit, but still a CPU cost."""
    kept_up = [step for step in steps if kept_up_with(step)]
    step = max(kept_up or steps, key=lambda s: s["calls"], default=None)
    if step is None or not step["server_millicores_per_call"]:
        return None
    return {
        "at_calls": step["calls"],
        "kept_up": bool(kept_up),
        "calls_per_core": _round(1000 / step["server_millicores_per_call"], 1),
    }


# -- comparisons ----------------------------------------------------------------------------


def kept_up_with(step: dict[str, Any]) -> bool:
    """Every call up, loss under a fifth of the saturation level, and no process of the
    server busy for SATURATED_PROCESS_CORES of a core (it would be queueing work)."""
    return (
        step["live"] >= step["calls"]
        and (step["loss"] or 0) <= SATURATED_LOSS / 5
        and (step["busiest_process_cores"] or 0) < SATURATED_PROCESS_CORES
    )


def _reference_step(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[dict, dict, bool] | None:
    """The largest call count both servers kept up with: the CPU per call of a saturated
    server is capped by the core it has, and would flatter it."""
    by_calls = {step["calls"]: step for step in theirs["steps"]}
    pairs = [
        (step, by_calls[step["calls"]])
        for step in ours["steps"]
        if step["calls"] in by_calls
        and kept_up_with(step)
        and kept_up_with(by_calls[step["calls"]])
    ]
    if not pairs:
        common = [(s, by_calls[s["calls"]], False) for s in ours["steps"] if s["calls"] in by_calls]
        return common[0] if common else None
    return (*pairs[-1], True)


def compare(ours: dict[str, Any], theirs: dict[str, Any], mode: str) -> dict[str, Any]:
    """voxrelay beside a baseline: CPU and memory per call, like for like and in total.

    The targets' verdicts ("pass") are given against the target baseline only; against a
    reference baseline (aiortc-tap) they are None, the ratios informational.
    """
    reference = _reference_step(ours, theirs)
    target_cpu = (
        TARGET_PASSTHROUGH_CPU_RATIO if mode == "passthrough" else TARGET_TRANSCODING_CPU_RATIO
    )
    role = theirs["system"].get("baseline_role") or "target"
    verdict = role == "target"
    result: dict[str, Any] = {
        "mode": mode,
        "voxrelay": ours["system"]["mode"],
        "baseline_server": theirs["system"].get("name"),
        "role": role,
        "informational": not verdict,
        "baseline": theirs["system"]["echo"],
        "transcodes": {
            "voxrelay": ours["system"]["transcodes"],
            "baseline": theirs["system"]["transcodes"],
        },
    }
    if reference is None:
        result["reference_calls"] = None
        return result
    mine, base, kept_up = reference
    like = ours["system"]["like_for_like_group"]
    mine_like = mine["millicores_per_call"].get(like) if like else None
    base_server = base["server_millicores_per_call"]
    cpu_like = ratio_of(base_server, mine_like)
    cpu_total = ratio_of(base_server, mine["server_millicores_per_call"])
    with_backend = None
    if "backend" in mine["millicores_per_call"] and mine_like is not None:
        with_backend = ratio_of(
            base_server, mine_like + (mine["millicores_per_call"]["backend"] or 0)
        )
    ours_marginal, theirs_marginal = (
        ours["marginal_millicores_per_call"],
        theirs["marginal_millicores_per_call"],
    )
    base_marginal = theirs_marginal.get("all")
    memory_like = ratio_of(
        ours["memory"]["like_for_like_kib_per_call_slope"],
        theirs["memory"]["like_for_like_kib_per_call_slope"],
    )
    memory_total = ratio_of(
        ours["memory"]["kib_per_call_slope"], theirs["memory"]["kib_per_call_slope"]
    )
    result.update(
        {
            "reference_calls": mine["calls"],
            "reference_kept_up": kept_up,
            "millicores_per_call": {
                "voxrelay_transceiver": mine_like,
                "voxrelay_all_processes": mine["server_millicores_per_call"],
                "voxrelay_by_group": mine["millicores_per_call"],
                "baseline": base_server,
                "callers_voxrelay": mine["callers"]["millicores_per_call"],
                "callers_baseline": base["callers"]["millicores_per_call"],
            },
            "cpu_advantage": {
                "transceiver": _round(cpu_like, 2),
                "all_processes": _round(cpu_total, 2),
                "transceiver_and_backend": _round(with_backend, 2),
                "target_at_least": target_cpu,
                "pass": (cpu_like is not None and cpu_like >= target_cpu) if verdict else None,
                "pass_all_processes": (
                    (cpu_total is not None and cpu_total >= target_cpu) if verdict else None
                ),
            },
            "marginal_millicores_per_call": {
                "voxrelay_transceiver": ours_marginal.get(like) if like else None,
                "voxrelay_all_processes": ours_marginal.get("all"),
                "baseline": base_marginal,
                "ratio_transceiver": _round(
                    ratio_of(base_marginal, ours_marginal.get(like) if like else None), 2
                ),
                "ratio_all_processes": _round(ratio_of(base_marginal, ours_marginal.get("all")), 2),
            },
            "memory_per_call_kib": {
                "voxrelay_transceiver": ours["memory"]["like_for_like_kib_per_call_slope"],
                "voxrelay_all_processes": ours["memory"]["kib_per_call_slope"],
                "baseline": theirs["memory"]["like_for_like_kib_per_call_slope"],
                "ratio_transceiver": _round(memory_like, 3),
                "ratio_all_processes": _round(memory_total, 3),
                "target_at_most": TARGET_MEMORY_RATIO,
                "pass": (
                    (memory_like is not None and memory_like <= TARGET_MEMORY_RATIO)
                    if verdict
                    else None
                ),
            },
        }
    )
    return result


def representative_step(series: dict[str, Any]) -> dict[str, Any] | None:
    """The step a server's summary row and cost describe: its capacity (the largest step
    within the limits), else the largest step it kept up with (a server whose echo is held
    too long for the round-trip limit), else its smallest step. Never a saturated step
    above its capacity: its round trips are queueing and its CPU per call is capped."""
    steps = series["steps"] + series["search"]
    chosen = [s for s in steps if s["accepted"]] or [s for s in steps if kept_up_with(s)]
    if chosen:
        return max(chosen, key=lambda s: s["calls"])
    return min(steps, key=lambda s: s["calls"], default=None)


def cost(series: dict[str, Any], vcpu_hour_usd: float) -> dict[str, Any] | None:
    """CPU per call at :func:`representative_step` as USD per 1,000 call-minutes."""
    step = representative_step(series)
    if step is None:
        return None
    millicores = step["server_millicores_per_call"]
    if millicores is None:
        return None
    # 1,000 call-minutes at m millicores each: m / 1000 cores x 1000 min = m / 60 core-hours.
    vcpu_hours = millicores / 60
    return {
        "at_calls": step["calls"],
        "millicores_per_call": millicores,
        "vcpu_hours_per_1000_call_minutes": _round(vcpu_hours, 5),
        "usd_per_1000_call_minutes": _round(vcpu_hours * vcpu_hour_usd, 5),
        "vcpu_hour_usd": vcpu_hour_usd,
    }


def build_report(
    settings: SessionsSettings, results: dict[str, dict[str, Any]], caller_pids: list[int]
) -> dict[str, Any]:

    comparisons = []
    for mode in settings.modes:
        of_mode = [r for r in results.values() if r["system"]["mode"] == mode]
        ours = next((r for r in of_mode if not r["system"]["is_baseline"]), None)
        baselines = sorted(
            (r for r in of_mode if r["system"]["is_baseline"]),
            key=lambda r: r["system"].get("baseline_role") != "target",  # the target first
        )
        if ours is not None:
            comparisons.extend(compare(ours, theirs, mode) for theirs in baselines)
    all_steps = [s for r in results.values() for s in r["steps"] + r["search"]]
    shares = [s["callers"]["share_of_all_cpu"] for s in all_steps]
    shares = [share for share in shares if share is not None]
    # Whether the figures describe the server: the steps it kept up with. Where it fell
    # over (refused steps) its CPU drops and the callers' share rises, describing nothing.
    kept_shares = [
        s["callers"]["share_of_all_cpu"]
        for s in all_steps
        if kept_up_with(s) and s["callers"]["share_of_all_cpu"] is not None
    ]
    busiest_caller = max(
        (max(s["callers"]["cores_per_process"], default=0) for s in all_steps), default=0
    )
    return {
        **report_header("voxrelay bench sessions"),
        "schema_version": SCHEMA_VERSION,
        "settings": settings.as_dict(),
        "servers": results,
        "comparisons": comparisons,
        "cost": {name: cost(r, settings.vcpu_hour_usd) for name, r in results.items()},
        "callers": {
            "processes": len(caller_pids),
            "pids": caller_pids,
            "max_share_of_all_cpu": max(shares, default=None),
            "median_share_of_all_cpu": statistics.median(shares) if shares else None,
            "busiest_process_cores": round(busiest_caller, 3),
            "max_share_where_server_kept_up": max(kept_shares, default=None),
            "minority": bool(kept_shares) and max(kept_shares) < 0.5,
        },
        "relay_only": "the relay alone (no ICE, DTLS or SRTP work) is measured by "
        "`voxrelay bench relay`; see the README's relay table",
        "notes": [
            "setup milestones are ms after the caller started POSTing its offer; ice is the "
            "first answered ICE check, connected the end of the DTLS handshake (SRTP keyed), "
            "first_echo the arrival of the first echoed packet (sent as soon as SRTP was keyed).",
            "round trips: from the CLOCK_REALTIME send time each payload carries in its "
            "Opus padding to the kernel's receive timestamp of the echo (SO_TIMESTAMPNS); "
            "loss counts the packets sent in a window whose echo did not come "
            "back within 0.5 s after it. A transcoding echo drops the padding: no round trip, "
            "and loss is the echo deficit (1 - echoes received / packets sent in the window).",
            "millicores per call: a process group's CPU time (user + system) over the window, "
            "per second, per live call. voxrelay's like-for-like group is the transceiver "
            "(ICE, DTLS, SRTP, echo, as an aiortc server); its relay workers and supervisor "
            "are added in 'all processes'. The callers are measured apart.",
            "memory per call: least-squares slope of proportional set size (PSS) over live "
            "calls, from the baseline before the ramp through each step. PSS divides each "
            "shared page among the processes that map it, so the relay's shared routing "
            "table counts once for the fleet, not once per worker. A step's own KiB per "
            "call (PSS above the baseline over its calls) can be negative at small steps: "
            "voxrelay's transceivers hand freed heap pages back every 10 s, so the "
            "warm-up's garbage counted in the baseline may be gone by then.",
            "baselines: 'aiortc' (passthrough) is aiortc's full receive and send pipeline "
            "(RTCRtpReceiver with its jitter buffer and decoder thread, the track, "
            "RTCRtpSender) with Opus passed through undecoded - the targets' verdicts are "
            "against it; its jitter buffer holds each echo ~80 ms, so its round trip fails the "
            "p99 limit at every count, but it keeps up and its CPU and memory per call compare. "
            "'aiortc-tap' skips the receiver, jitter buffer and decoder thread (RTP tapped "
            "after SRTP): a reference, no verdict. 'aiortc-stock' (pcm) decodes and re-encodes.",
            "the machine may be shared with other work: compare servers within this run only.",
        ],
    }


# -- rendering ------------------------------------------------------------------------------


def _transcodes(flag: bool) -> str:
    return "transcodes" if flag else "passes through (no transcoding)"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: ""}[passed]


def _target_text(target: str, passed: bool | None, relation: str) -> str:
    """The verdict in brackets, e.g. (target >= 5x PASS); nothing for a reference baseline."""
    return "" if passed is None else f" (target{relation}{target} {_verdict(passed)})"


def render_table(data: dict[str, Any]) -> str:
    s = data["settings"]
    steps = " and ".join(
        f"{'pcm ' if mode == 'pcm' else ''}steps {s['pcm_calls' if mode == 'pcm' else 'calls']}"
        for mode in s["modes"]
    )
    lines = [
        f"voxrelay bench sessions: {steps} calls x {s['duration_s']:g} s, "
        f"{data['callers']['processes']} caller processes, limits p99 < {s['rtt_p99_ms_max']:g} "
        f"ms and loss < {s['max_loss']:.1%}",
        "",
        f"{'server':<14}{'calls':>6}{'up':>6}{'rtt p50':>9}{'p99':>8}{'loss':>8}{'reord':>6}"
        f"{'server':>8}{'wait':>6}{'mc/call':>8}{'like':>7}{'KiB/call':>9}{'callers':>8}"
        f"{'share':>6}  ok",
        f"{'':<14}{'':>6}{'':>6}{'ms':>9}{'ms':>8}{'':>8}{'':>6}{'cores':>8}{'cores':>6}"
        f"{'all':>8}{'mc':>7}{'like':>9}{'cores':>8}{'':>6}",
    ]
    for name, result in data["servers"].items():
        like = result["system"]["like_for_like_group"]
        for step in sorted(result["steps"] + result["search"], key=lambda x: x["calls"]):
            rtt = step["rtt_ms"] or {}
            lines.append(
                f"{name:<14}{step['calls']:>6}{step['live']:>6}{fmt(rtt.get('p50'), '.2f'):>9}"
                f"{fmt(rtt.get('p99'), '.2f'):>8}{fmt(step['loss'], '.2%'):>8}"
                f"{step['reordered']:>6}{fmt(step['server_cores'], '.2f'):>8}"
                f"{fmt(step['contention']['server_wait_cores'], '.2f'):>6}"
                f"{fmt(step['server_millicores_per_call'], '.2f'):>8}"
                f"{fmt(step['millicores_per_call'].get(like) if like else None, '.2f'):>7}"
                f"{fmt(step['pss_kib_per_call'].get(like) if like else None, '.0f'):>9}"
                f"{step['callers']['cores']:>8.2f}"
                f"{fmt(step['callers']['share_of_all_cpu'], '.0%'):>6}"
                f"  {'yes' if step['accepted'] else 'no'}"
            )
        if result["stopped"]:
            lines.append(f"{'':<14}{result['stopped']}")
        if result.get("search_note"):
            lines.append(f"{'':<14}{result['search_note']}")
    lines += ["", "servers"]
    for name, result in data["servers"].items():
        role = result["system"].get("baseline_role")
        lines.append(f"  {name:<14}{result['system']['echo']}" + (f" [{role}]" if role else ""))
    lines += ["", "setup, ms after the offer POST: p50 / p95 / p99 (calls ok/total)"]
    for name, result in data["servers"].items():
        for phase in PHASES:
            summary = result["setup"][phase]
            if not summary["calls"]:
                continue
            parts = []
            for milestone in ("connected", "first_echo"):
                m = summary["milestones_ms"][milestone]
                parts.append(
                    f"{MILESTONE_LABELS[milestone]} {fmt(m['p50'])} / {fmt(m['p95'])} / "
                    f"{fmt(m['p99'])}"
                )
            lines.append(
                f"  {name:<14}{phase:<6}{'; '.join(parts)}  ({summary['ok']}/{summary['calls']})"
            )
    lines += ["", "capacity (p99 and loss within the limits) and cost"]
    for name, result in data["servers"].items():
        capacity = result["capacity"]
        money = data["cost"].get(name)
        if capacity:
            cap_text = (
                f"{'' if capacity['bounded'] else '>= '}{capacity['calls']} calls, "
                f"{fmt(capacity['calls_per_server_core'], '.0f')} calls per core used "
                f"({fmt(capacity['server_cores_used'], '.2f')} cores)"
            )
        else:
            cap_text = result.get("capacity_note") or "none of the counts tried"
            bound = result.get("cpu_bound")
            if bound:
                cap_text += (
                    f"; CPU-bound {fmt(bound['calls_per_core'], '.0f')} calls per core (at "
                    f"{bound['at_calls']} calls{'' if bound['kept_up'] else ', not kept up'})"
                )
        cost_text = ""
        if money:
            cost_text = (
                f"; ${money['usd_per_1000_call_minutes']:.4f} per 1,000 call-minutes at "
                f"${money['vcpu_hour_usd']:g}/vCPU-h ({money['millicores_per_call']:.2f} mc/call)"
            )
        lines.append(f"  {name:<14}{cap_text}{cost_text}")
    for comparison in data["comparisons"]:
        if comparison.get("reference_calls") is None:
            continue
        cpu, memory = comparison["cpu_advantage"], comparison["memory_per_call_kib"]
        mc = comparison["millicores_per_call"]
        marginal = comparison["marginal_millicores_per_call"]
        them = comparison.get("baseline_server") or "aiortc"
        lines += [
            "",
            f"{comparison['mode']} at {comparison['reference_calls']} calls, voxrelay vs "
            f"{them}"
            + (" (REFERENCE only: no verdict)" if comparison.get("informational") else "")
            + f": voxrelay {_transcodes(comparison['transcodes']['voxrelay'])}, {them} "
            f"{_transcodes(comparison['transcodes']['baseline'])}"
            + (
                ""
                if comparison["reference_kept_up"]
                else "; NOT KEPT UP at any common count (loss or failed calls): a saturated "
                "server's CPU per call is capped, so its ratio is a lower bound"
            ),
            f"  CPU per call, millicores: transceiver {fmt(mc['voxrelay_transceiver'], '.2f')}, "
            f"all voxrelay processes {fmt(mc['voxrelay_all_processes'], '.2f')}, {them} "
            f"{fmt(mc['baseline'], '.2f')}",
            f"  marginal (slope over the steps): transceiver "
            f"{fmt(marginal['voxrelay_transceiver'], '.2f')}, all "
            f"{fmt(marginal['voxrelay_all_processes'], '.2f')}, {them} "
            f"{fmt(marginal['baseline'], '.2f')}",
            f"  {them} / voxrelay: transceiver {fmt(cpu['transceiver'], '.1f')}x"
            + _target_text(f"{cpu['target_at_least']:g}x", cpu["pass"], " >= ")
            + f", all processes {fmt(cpu['all_processes'], '.1f')}x"
            + (f" {_verdict(cpu['pass_all_processes'])}" if cpu["pass"] is not None else "")
            + (
                f", transceiver + backend {fmt(cpu['transceiver_and_backend'], '.1f')}x"
                if cpu["transceiver_and_backend"] is not None
                else ""
            ),
            f"  memory per call, KiB: transceiver {fmt(memory['voxrelay_transceiver'], '.0f')}, "
            f"{them} {fmt(memory['baseline'], '.0f')}; ratio "
            f"{fmt(memory['ratio_transceiver'], '.2f')}"
            + _target_text(f"{memory['target_at_most']:g}", memory["pass"], " <= "),
        ]
    callers = data["callers"]
    lines += [
        "",
        f"callers: at most {fmt(callers.get('max_share_where_server_kept_up'), '.0%')} of all "
        f"CPU in the steps the server kept up with ({fmt(callers['max_share_of_all_cpu'], '.0%')}"
        f" in any step; median {fmt(callers['median_share_of_all_cpu'], '.0%')}), busiest "
        f"caller process {callers['busiest_process_cores']:.2f} cores",
        "wait: cores' worth of time the server's processes were runnable but waiting for a CPU "
        "(other work on the machine, or the callers); high values inflate round trips",
        f"relay only: {data['relay_only']}",
    ]
    for name, result in data["servers"].items():
        soak = result.get("soak")
        if soak:
            lines.append(
                f"soak {name}: {soak['calls']} calls for {soak['duration_s']:g} s, PSS "
                f"{fmt(soak['pss_mb_first'])} -> {fmt(soak['pss_mb_last'])} MB, "
                f"{fmt(soak['pss_mb_per_10_min'], '.2f')} MB per 10 min (second half "
                f"{fmt(soak['pss_mb_per_10_min_second_half'], '.2f')})"
            )
    return "\n".join(lines)


def render_markdown(data: dict[str, Any]) -> str:
    """The README's sessions table: one row per comparison figure."""
    s = data["settings"]
    rows = [
        f"## Performance (calls, `voxrelay bench sessions`, "
        f"{data['machine']['cpus']}-core machine)",
        "",
        f"Steps {', '.join(map(str, s['calls']))} calls"
        + (
            f" (pcm: {', '.join(map(str, s['pcm_calls']))})"
            if "pcm" in s["modes"] and s["pcm_calls"] != s["calls"]
            else ""
        )
        + f", {s['duration_s']:g} s each, Opus-sized packets at 50/s each way; limits p99 "
        f"round trip < {s['rtt_p99_ms_max']:g} ms and loss < {s['max_loss']:.1%}. mc: "
        "millicores (ms of CPU per second) per call, all of the server's processes; KiB: "
        "memory (PSS) per call of the transceiver or aiortc server; cost at "
        f"${s['vcpu_hour_usd']:g} per vCPU-hour.",
        "",
        "| server | echo | capacity (calls) | calls per core | rtt p50 / p99 ms | setup p50 ms "
        "(idle / load / herd) | mc per call | KiB per call | $ per 1k call-min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name, result in data["servers"].items():
        capacity = result["capacity"] or {}
        capacity_cell = (
            f"{'' if capacity.get('bounded', True) else '≥'}{capacity['calls']}"
            if capacity
            else "none *"
        )
        per_core = fmt(capacity.get("calls_per_server_core"), ".0f")
        bound = result.get("cpu_bound")
        if not capacity and bound:
            per_core = f"{fmt(bound['calls_per_core'], '.0f')} (CPU-bound) *"
        if not capacity:
            notes.append(f"\\* {name}: {result.get('capacity_note') or 'no capacity'}.")
        step = representative_step(result) or {}
        rtt = step.get("rtt_ms") or {}
        setups = " / ".join(
            fmt(result["setup"][phase]["milestones_ms"]["first_echo"]["p50"]) for phase in PHASES
        )
        money = data["cost"].get(name) or {}
        like = result["system"]["like_for_like_group"]
        echo = result["system"].get("echo_short") or (
            "transcodes" if result["system"]["transcodes"] else "passthrough"
        )
        rows.append(
            f"| {name} | {echo} | {capacity_cell} | {per_core}"
            f" | {fmt(rtt.get('p50'), '.2f')} / {fmt(rtt.get('p99'), '.2f')} | {setups} | "
            f"{fmt(step.get('server_millicores_per_call'), '.2f')} | "
            f"{fmt(result['memory']['like_for_like_kib_per_call_slope'] if like else None, '.0f')}"
            f" | {fmt(money.get('usd_per_1000_call_minutes'), '.4f')} |"
        )
    if notes:
        rows += ["", *notes]
    rows += [""] + [
        f"- {name}: {result['system']['echo']}." for name, result in data["servers"].items()
    ]
    for comparison in data["comparisons"]:
        if comparison.get("reference_calls") is None:
            continue
        cpu, memory = comparison["cpu_advantage"], comparison["memory_per_call_kib"]
        them = comparison.get("baseline_server") or "aiortc"
        rows.append("")
        rows.append(
            f"{comparison['mode']}"
            + (" (for reference only, no verdict)" if comparison.get("informational") else "")
            + f": {them} uses {fmt(cpu['transceiver'], '.1f')}x the CPU per "
            f"call of the voxrelay transceiver ({fmt(cpu['all_processes'], '.1f')}x of all "
            "voxrelay processes"
            + (
                f"; target ≥{cpu['target_at_least']:g}x, {_verdict(cpu['pass'])}"
                if cpu["pass"] is not None
                else ""
            )
            + f") and voxrelay {fmt(memory['ratio_transceiver'], '.2f')}x {them}'s memory per "
            "call"
            + (
                f" (target ≤{memory['target_at_most']:g}, {_verdict(memory['pass'])})"
                if memory["pass"] is not None
                else ""
            )
            + f", at {comparison['reference_calls']} calls"
            + (
                "."
                if comparison["reference_kept_up"]
                else " (a server lost packets there: a saturated server's CPU per call is "
                "capped, so the ratio is a lower bound)."
            )
        )
    rows += ["", "Reproduce with `" + data["command"] + "`."]
    return "\n".join(rows) + "\n"


# -- plots ----------------------------------------------------------------------------------


def plot_setup(data: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, (cdf, bars) = plt.subplots(1, 2, figsize=(14, 5))
    styles = {"idle": "-", "load": "--", "herd": ":"}
    for index, (name, result) in enumerate(data["servers"].items()):
        colour = colour_for(name, index)
        for phase in PHASES:
            values = sorted(r["ms"]["first_echo"] for r in result["setup_calls"][phase] if r["ok"])
            if values:
                cdf.step(
                    [values[0], *values],
                    [i / len(values) for i in range(len(values) + 1)],
                    where="post",
                    linestyle=styles[phase],
                    color=colour,
                    label=f"{name} {phase}",
                )
    cdf.set_xscale("log")
    cdf.set_title("Setup: offer POST -> first echoed packet (CDF over calls)", fontsize=10)
    cdf.set_xlabel("ms (log scale)")
    cdf.set_ylabel("fraction of calls")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    cdf.legend(fontsize=7)
    groups = [f"{phase}\n{q}" for phase in PHASES for q in ("p50", "p99")]
    grouped_bars(
        bars,
        groups,
        {
            name: [
                result["setup"][phase]["milestones_ms"]["first_echo"][q]
                for phase in PHASES
                for q in ("p50", "p99")
            ]
            for name, result in data["servers"].items()
        },
        title="First echo after the offer POST: idle, under load, all at once",
        ylabel="ms",
        value_format="{:.0f}",
    )
    bars.legend(fontsize=8)
    return save_figure(figure, path)


def plot_load(data: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, (rtt_axes, loss_axes) = plt.subplots(1, 2, figsize=(14, 5))
    limit = data["settings"]["rtt_p99_ms_max"]
    for index, (name, result) in enumerate(data["servers"].items()):
        colour = colour_for(name, index)
        steps = sorted(result["steps"] + result["search"], key=lambda x: x["calls"])
        with_rtt = [x for x in steps if x["rtt_ms"]]
        if with_rtt:
            calls = [x["live"] for x in with_rtt]
            rtt_axes.plot(
                calls,
                [x["rtt_ms"]["p50"] for x in with_rtt],
                "o-",
                color=colour,
                label=f"{name} p50",
            )
            rtt_axes.plot(
                calls,
                [x["rtt_ms"]["p99"] for x in with_rtt],
                "s--",
                color=colour,
                label=f"{name} p99",
            )
        loss_axes.plot(
            [x["live"] for x in steps],
            [100 * (x["loss"] or 0) for x in steps],
            "o-",
            color=colour,
            label=name,
        )
    rtt_axes.axhline(limit, color="#d62728", linestyle=":", label=f"p99 limit {limit:g} ms")
    rtt_axes.set_yscale("log")
    rtt_axes.set_title("Round trip vs concurrent calls (passthrough echoes)", fontsize=10)
    rtt_axes.set_xlabel("concurrent calls")
    rtt_axes.set_ylabel("ms (log scale)")
    rtt_axes.grid(alpha=0.3)
    rtt_axes.legend(fontsize=7)
    loss_axes.axhline(
        100 * data["settings"]["max_loss"], color="#d62728", linestyle=":", label="loss limit"
    )
    loss_axes.set_yscale("symlog", linthresh=0.01)
    loss_axes.set_title("Loss (transcoding: echo deficit) vs concurrent calls", fontsize=10)
    loss_axes.set_xlabel("concurrent calls")
    loss_axes.set_ylabel("% of packets sent")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(fontsize=7)
    return save_figure(figure, path)


def plot_cost(data: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, (cpu_axes, memory_axes) = plt.subplots(1, 2, figsize=(14, 5))
    for index, (name, result) in enumerate(data["servers"].items()):
        colour = colour_for(name, index)
        # Only steps the server kept up with: where it fell over, calls hang, its CPU per
        # call is capped by its core and its heap holds queued work; those figures
        # describe nothing (the load plot shows where and how it fell over).
        steps = sorted(
            (x for x in result["steps"] + result["search"] if kept_up_with(x)),
            key=lambda x: x["calls"],
        )
        if not steps:
            continue
        calls = [x["live"] for x in steps]
        like = result["system"]["like_for_like_group"]
        cpu_axes.plot(
            calls,
            [x["server_millicores_per_call"] for x in steps],
            "o-",
            color=colour,
            label=f"{name} all processes" if len(result["system"]["pids"]) > 1 else name,
        )
        if like and len(result["system"]["pids"]) > 1:
            cpu_axes.plot(
                calls,
                [x["millicores_per_call"][like] for x in steps],
                "^--",
                color=colour,
                label=f"{name} {like}",
            )
        cpu_axes.plot(
            calls,
            [x["callers"]["millicores_per_call"] for x in steps],
            "x:",
            color=colour,
            label=f"callers of {name}",
        )
        memory = steps_for_memory(result["steps"])
        if like and memory:
            base = result["memory"]["baseline_pss_mb"].get(like, 0)
            memory_axes.plot(
                [0, *(x["live"] for x in memory)],
                [0, *((x["pss_mb"][like] - base) for x in memory)],
                "o-",
                color=colour,
                label=f"{name} {like}",
            )
    cpu_axes.set_yscale("log")  # passthrough and transcoding differ tenfold
    cpu_axes.yaxis.set_major_formatter(_plain_numbers())
    cpu_axes.yaxis.set_minor_formatter(_plain_numbers())
    cpu_axes.set_title(
        "CPU per call (millicores = ms of CPU per second), steps each server kept up with",
        fontsize=10,
    )
    cpu_axes.set_xlabel("concurrent calls")
    cpu_axes.set_ylabel("millicores per call")
    cpu_axes.grid(alpha=0.3)
    cpu_axes.legend(fontsize=7)
    memory_axes.set_yscale("symlog", linthresh=10)  # servers differ a hundredfold
    memory_axes.yaxis.set_major_formatter(_plain_numbers())
    memory_axes.set_title(
        "Memory (PSS) added vs concurrent calls (ramp, until a server falls over)",
        fontsize=10,
    )
    memory_axes.set_xlabel("concurrent calls")
    memory_axes.set_ylabel("MB above the idle baseline")
    memory_axes.grid(alpha=0.3)
    memory_axes.legend(fontsize=7)
    return save_figure(figure, path)


def _plain_numbers() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _position: f"{value:g}")


def plot_soak(data: dict[str, Any], path: Path) -> Path | None:
    soaks = {name: r["soak"] for name, r in data["servers"].items() if r.get("soak")}
    if not soaks:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, (name, soak) in enumerate(soaks.items()):
        times = [row["t_s"] for row in soak["samples"]]
        groups = sorted({g for row in soak["samples"] for g in row["pss_mb"]})
        for offset, group in enumerate(groups):
            axes.plot(
                times,
                [row["pss_mb"][group] for row in soak["samples"]],
                "o-",
                color=colour_for(f"{name} {group}", index * len(groups) + offset),
                label=f"{name} {group}",
            )
        axes.set_title(
            f"Soak: PSS at {soak['calls']} calls over {soak['duration_s']:g} s", fontsize=10
        )
    axes.set_xlabel("seconds")
    axes.set_ylabel("PSS, MB")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return save_figure(figure, path)


# -- the run --------------------------------------------------------------------------------


async def measure(
    settings: SessionsSettings, workdir: Path, progress: Progress
) -> tuple[dict[str, dict[str, Any]], list[int]]:
    pool = CallerPool(settings.caller_processes, workdir / "callers.log")
    results: dict[str, dict[str, Any]] = {}
    pids: list[int] = []
    try:
        await pool.start()
        pids = pool.pids
        progress.note(f"{settings.caller_processes} caller processes up (pids {pool.pids})")
        for mode in settings.modes:
            systems = _systems(settings, mode, workdir, progress)
            try:
                for system in systems:
                    series = Series(system, pool, settings, progress)
                    try:
                        soak = system.mode == "passthrough" and not system.is_baseline
                        await series.run(soak=soak)
                    finally:
                        with contextlib.suppress(BenchError, TimeoutError):
                            await asyncio.wait_for(pool.hang_up(), 30)
                    results[system.name] = series.summary()
            finally:
                systems.close()  # stops the server of the current turn
    finally:
        await pool.close()
    return results, pids


def _systems(
    settings: SessionsSettings, mode: str, workdir: Path, progress: Progress
) -> Iterator[System]:
    """Start each server of ``mode`` when its turn comes, stop it when the next starts."""
    with contextlib.ExitStack() as own:
        if settings.target and mode == "passthrough":
            status = fetch_status(settings.target)
            system = voxrelay_system(status, settings.target, mode, settings.token)
        else:
            fleet_dir = Path(tempfile.mkdtemp(prefix=f"fleet-{mode}-", dir=workdir))
            backend: EchoBackendProcess | None = None
            if mode == "pcm":
                backend = EchoBackendProcess()
                own.callback(backend.close)
                fleet: TemporaryFleet = PcmFleet(
                    fleet_dir, settings.transceivers, settings.workers, backend.url
                )
            else:
                fleet = TemporaryFleet(fleet_dir, settings.transceivers, settings.workers)
            own.callback(fleet.close)
            status = _with_every_pid(fleet.start())
            system = voxrelay_system(status, "the temporary fleet", mode, None)
            if backend is not None and system.processes:
                system.processes["backend"] = [backend.process.pid]
        progress.note(f"{system.name}: {system.whip_url} (processes {system.processes})")
        yield system
    running = aiortc_baselines(settings.baselines, mode)
    for option in set(settings.baselines) - {b.option for b in running}:
        progress.note(f"{option}: not run in {mode} mode (passthrough only)")
    for baseline in running:
        with contextlib.ExitStack() as own:
            server = AiortcServerProcess(baseline.kind)
            own.callback(server.close)
            system = aiortc_system(baseline, server.info["whip_url"], server.process.pid)
            progress.note(f"{system.name}: {system.whip_url} (pid {server.process.pid})")
            yield system


def _with_every_pid(status: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """The fleet's /status once every relay worker and transceiver reports its pid.

    A worker writes its pid into shared memory when it starts, so a status taken right
    after `voxrelay up` may lack some, and their CPU would silently go uncounted.
    """

    def complete(view: dict[str, Any]) -> bool:
        workers = (view.get("relay") or {}).get("workers") or []
        local = view.get("local_transceivers") or []
        return all(row.get("pid") for row in (*workers, *local))

    deadline = time.monotonic() + timeout
    while not complete(status):
        if time.monotonic() > deadline or not status.get("metrics_url"):
            raise BenchError("the fleet's relay workers or transceivers report no pid")
        time.sleep(0.1)
        status = fetch_status(status["metrics_url"])
    return status


def run_benchmark(settings: SessionsSettings, out: Path | None, command: str) -> dict[str, Any]:
    """Start what is needed, measure, stop everything (even on errors); returns the data."""
    progress = Progress()
    with contextlib.ExitStack() as stack, terminate_as_interrupt():
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voxrelay-sess-")))
        results, caller_pids = asyncio.run(interruptible(measure(settings, workdir, progress)))
    data = build_report(settings, results, caller_pids)
    data["command"] = command
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sessions.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "sessions.md").write_text(render_markdown(data))
        plot_setup(data, out / "sessions_setup.png")
        plot_load(data, out / "sessions_load.png")
        plot_cost(data, out / "sessions_cpu_memory.png")
        plot_soak(data, out / "sessions_soak.png")
    return data


def parse_baselines(value: str) -> tuple[str, ...]:
    """``--baseline``: "none", or a comma list of BASELINES (each once); in BASELINES order.

    Raises ValueError saying what is accepted.
    """
    names = [part.strip().lower() for part in value.split(",")]
    if names == ["none"]:
        return ()
    expected = f"none, {', '.join(BASELINES)}, or a comma list such as {','.join(BASELINES)}"
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}: expected {expected}")
    if len(set(names)) != len(names):
        raise ValueError(f"a baseline is named twice in {value!r}: expected {expected}")
    return tuple(name for name in BASELINES if name in names)


def _baseline_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_baselines(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _calls_list(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        calls = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of call counts, e.g. 50,100,200") from None
    if not calls or any(c < 1 or c > 20_000 for c in calls) or list(calls) != sorted(set(calls)):
        raise click.BadParameter("call counts must be 1..20000, increasing, e.g. 50,100,200")
    return calls


@click.command("sessions")
@click.option(
    "--calls",
    default="50,100,200,400",
    show_default=True,
    callback=_calls_list,
    help="Concurrent call counts to step through, increasing.",
)
@click.option(
    "--pcm-calls",
    default=None,
    callback=_calls_list,
    help="Call counts for --mode pcm (transcoding costs several times more per call)  "
    "[default: --calls]",
)
@click.option(
    "--duration",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds measured at each step.",
)
@click.option(
    "--baseline",
    "baselines",
    default="none",
    show_default=True,
    callback=_baseline_list,
    metavar="none|aiortc|aiortc-tap[,...]",
    help="Also run aiortc echo servers under the same callers: aiortc (passthrough: "
    "aiortc's receiver, jitter buffer and sender with Opus passed through, the targets' "
    "baseline; pcm: stock aiortc, transcoding), aiortc-tap (passthrough only: RTP tapped "
    "after SRTP, a reference), or both, comma-separated.",
)
@click.option(
    "--mode",
    type=click.Choice(["passthrough", "pcm", "both"]),
    default="passthrough",
    show_default=True,
    help="passthrough: echo without transcoding; pcm: the "
    "transceiver transcodes for a PCM WebSocket backend (baseline: stock "
    "aiortc, aiortc-stock in the report).",
)
@click.option(
    "--target",
    default=None,
    metavar="URL",
    help="A running fleet's status URL (or a transceiver's signaling URL) instead "
    "of a temporary fleet (passthrough mode).",
)
@click.option("--token", default=None, help="WHIP bearer token for --target.")
@click.option(
    "--caller-processes",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Caller processes; the calls are spread over them.",
)
@click.option(
    "--ramp-rate",
    default=50.0,
    show_default=True,
    type=click.FloatRange(0.1, 10_000),
    help="New calls per second while stepping up.",
)
@click.option(
    "--idle-calls",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Calls set up one at a time on an idle server (setup at idle).",
)
@click.option(
    "--herd-calls",
    default=None,
    type=click.IntRange(0, 20_000),
    help="Calls dialled all at once (thundering herd)  [default: the first step]",
)
@click.option(
    "--rtt-p99-ms",
    default=50.0,
    show_default=True,
    type=click.FloatRange(0.1, 10_000),
    help="Capacity limit: p99 round trip.",
)
@click.option(
    "--max-loss",
    default=0.001,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Capacity limit: loss (fraction).",
)
@click.option(
    "--search-steps",
    default=3,
    show_default=True,
    type=click.IntRange(0, 20),
    help="Extra steps bisecting between the last accepted and the first refused count.",
)
@click.option(
    "--soak",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 86_400),
    help="Seconds to hold --soak-calls on voxrelay, sampling PSS (600: 10 minutes).",
)
@click.option(
    "--soak-calls",
    default=None,
    type=click.IntRange(1, 20_000),
    help="Calls held during the soak  [default: the first step]",
)
@click.option(
    "--soak-interval",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds between soak samples.",
)
@call_timeout_option
@click.option(
    "--vcpu-hour-usd",
    default=0.04,
    show_default=True,
    type=click.FloatRange(0),
    help="Price of one vCPU-hour, for the cost per 1,000 call-minutes.",
)
@temporary_fleet_options
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for sessions.json, sessions.md and the PNG plots.",
)
def sessions_command(
    calls: tuple[int, ...],
    pcm_calls: tuple[int, ...] | None,
    duration: float,
    baselines: tuple[str, ...],
    mode: str,
    target: str | None,
    token: str | None,
    caller_processes: int,
    ramp_rate: float,
    idle_calls: int,
    herd_calls: int | None,
    rtt_p99_ms: float,
    max_loss: float,
    search_steps: int,
    soak: float,
    soak_calls: int | None,
    soak_interval: float,
    call_timeout: float,
    vcpu_hour_usd: float,
    transceivers: int,
    workers: int,
    out_dir: str | None,
) -> None:
    """Whole calls under load: setup time, round trip, loss, CPU and memory per call.

    Sans-IO callers (several processes, many calls each) do WHIP, ICE, DTLS and SRTP, send
    Opus-sized packets at 50/s and time the echo, stepping through --calls; with --baseline,
    aiortc echo servers are measured the same way in the same run. Prints progress and a
    table; --out writes JSON, a Markdown table and PNG plots.
    """
    modes = MODES if mode == "both" else (mode,)
    if target and "pcm" in modes:
        raise click.BadParameter(
            "pcm mode starts its own fleet; drop --target", param_hint="--mode"
        )
    if baselines and not any(aiortc_baselines(baselines, m) for m in modes):
        raise click.BadParameter(
            f"{','.join(baselines)} runs in passthrough mode only; use --baseline aiortc "
            "(stock aiortc) with --mode pcm",
            param_hint="--baseline",
        )
    settings = SessionsSettings(
        calls=calls,
        pcm_calls=pcm_calls or calls,
        duration=duration,
        baselines=baselines,
        modes=modes,
        target=target,
        token=token,
        caller_processes=caller_processes,
        ramp_rate=ramp_rate,
        idle_calls=idle_calls,
        herd_calls=herd_calls,
        rtt_p99_ms=rtt_p99_ms,
        max_loss=max_loss,
        search_steps=search_steps,
        soak=soak,
        soak_calls=soak_calls or calls[0],
        soak_interval=soak_interval,
        call_timeout=call_timeout,
        vcpu_hour_usd=vcpu_hour_usd,
        transceivers=transceivers,
        workers=workers,
    )
    out = Path(out_dir) if out_dir else None
    arguments = sys.argv[sys.argv.index("sessions") + 1 :] if "sessions" in sys.argv else []
    command = " ".join(["voxrelay bench sessions", *(_quote(a) for a in arguments)])
    data = run_reporting_errors(
        lambda: run_benchmark(settings, out, command.strip()), (BenchError, PlotError)
    )
    click.echo(render_table(data))
    if out is not None:
        click.echo(f"wrote {out}/sessions.json, sessions.md and sessions_*.png")


def _quote(argument: str) -> str:
    import shlex

    return shlex.quote(argument)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "aiortc-server" and sys.argv[2] in AIORTC_SERVER_KINDS:
        serve_aiortc(sys.argv[2])
    else:
        sys.exit(
            "usage: python -m voxrelay.bench.sessions_bench aiortc-server "
            + "|".join(AIORTC_SERVER_KINDS)
        )
