"""Mouth-to-ear latency through the whole fleet: `voxrelay bench latency`.

Each probe call is a real WebRTC call (our sans-IO :class:`~voxrelay.proto.caller.
CallerSession` over a UDP socket: WHIP offer/answer, ICE, DTLS, SRTP) that "speaks" a
short beep every ``--interval`` seconds into an Opus encoder, with quiet noise between
beeps, and listens to what comes back. Latency of one beep = the moment its first
sample would have been captured (the frame clock of the caller) to the moment the echoed
packet carrying the beep's onset arrives, decoded, plus the onset's offset inside that
packet. So it counts: the 20 ms frame the encoder fills, Opus encode and decode delay,
the network path caller -> relay -> transceiver -> backend -> transceiver -> relay ->
caller, and all processing on the way. It excludes what depends on the caller's device
(microphone and speaker buffers, the caller's jitter buffer).

Reports p50/p95/p99 over all beeps of all calls, writes ``latency.json`` and
``latency.png`` with ``--out``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
BEEP_SECONDS = 0.06
BEEP_FREQUENCY = 1000.0
NOISE_AMPLITUDE = 60  # about -55 dBFS: keeps the encoder out of DTX between beeps
ONSET_THRESHOLD = 4000  # int16 amplitude that only a beep reaches


@dataclass
class ProbeResult:
    latencies: list[float] = field(default_factory=list)
    beeps_sent: int = 0
    beeps_heard: int = 0
    connect_time: float | None = None
    error: str = ""


class _Codec:
    """Opus encoder and decoder for one probe call (PyAV / libopus)."""

    def __init__(self) -> None:
        import av

        self.av = av
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate = SAMPLE_RATE
        encoder.layout = "mono"
        encoder.format = "s16"
        encoder.bit_rate = 32_000
        encoder.options = {"application": "voip", "frame_duration": "20"}
        encoder.open()
        self.encoder: Any = encoder
        decoder = av.CodecContext.create("opus", "r")
        decoder.sample_rate = SAMPLE_RATE
        decoder.layout = "mono"
        self.decoder: Any = decoder
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self.pts = 0

    def encode(self, pcm: bytes) -> list[bytes]:
        frame = self.av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.pts
        self.pts += FRAME_SAMPLES
        return [bytes(packet) for packet in self.encoder.encode(frame)]

    def decode(self, packet: bytes) -> bytes:
        out = bytearray()
        for decoded in self.decoder.decode(self.av.Packet(packet)):
            for converted in self.resampler.resample(decoded):
                out += bytes(converted.planes[0])[: converted.samples * 2]
        return bytes(out)


def _frame(beep_sample: int | None, rng: random.Random) -> bytes:
    """One 20 ms frame: noise, with the beep from ``beep_sample`` (index in frame) on."""
    import numpy as np

    noise = rng.normalvariate
    samples = np.array([noise(0, NOISE_AMPLITUDE) for _ in range(FRAME_SAMPLES)])
    if beep_sample is not None:
        t = np.arange(FRAME_SAMPLES - beep_sample) / SAMPLE_RATE
        samples[beep_sample:] += 0.5 * 32767 * np.sin(2 * math.pi * BEEP_FREQUENCY * t)
    return samples.clip(-32768, 32767).astype("<i2").tobytes()


def _onset(pcm: bytes) -> int | None:
    import numpy as np

    samples = np.abs(np.frombuffer(pcm, dtype="<i2"))
    loud = np.nonzero(samples > ONSET_THRESHOLD)[0]
    return int(loud[0]) if loud.size else None


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr) -> None:
        self.on_datagram(data)


async def probe_call(
    whip_url: str, *, duration: float, interval: float, token: str | None = None
) -> ProbeResult:
    """One call: connect, beep every ``interval`` s for ``duration`` s, time each echo."""
    from aiohttp import ClientSession, ClientTimeout

    from voxrelay.proto.caller import CallerSession
    from voxrelay.proto.dtls import generate_certificate
    from voxrelay.proto.session import AudioReceived, Closed, Connected

    loop = asyncio.get_running_loop()
    result = ProbeResult()
    codec = _Codec()
    rng = random.Random(os.getpid() ^ id(result))
    caller = CallerSession(generate_certificate(time.time()), now=loop.time())
    heard_onset = asyncio.Event()
    state: dict[str, Any] = {"pending": None, "closed": False}

    def on_datagram(data: bytes) -> None:
        caller.receive_datagram(data, loop.time())
        pump()

    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(on_datagram), local_addr=("127.0.0.1", 0)
    )
    local_host, local_port = transport.get_extra_info("sockname")[:2]
    timer: list[asyncio.TimerHandle | None] = [None]

    def pump() -> None:
        while (event := caller.next_event()) is not None:
            if isinstance(event, Connected) and result.connect_time is None:
                result.connect_time = event.elapsed
            elif isinstance(event, AudioReceived):
                pending = state["pending"]
                if pending is None:
                    continue
                onset = _onset(codec.decode(event.payload))
                if onset is not None:
                    result.latencies.append(event.arrival + onset / SAMPLE_RATE - pending)
                    result.beeps_heard += 1
                    state["pending"] = None
                    heard_onset.set()
            elif isinstance(event, Closed):
                state["closed"] = True
        remote = caller.remote_address
        for datagram in caller.datagrams_to_send():
            if remote is not None:
                transport.sendto(datagram, remote)
        due = caller.get_timer()
        if timer[0] is not None:
            timer[0].cancel()
        timer[0] = loop.call_at(due, on_timer) if due is not None else None

    def on_timer() -> None:
        timer[0] = None
        caller.handle_timer(loop.time())
        pump()

    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    location = None
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            offer = caller.offer_sdp(local_host, local_port)
            async with http.post(whip_url, data=offer, headers=headers) as response:
                if response.status != 201:
                    result.error = f"WHIP answered {response.status}: {await response.text()}"
                    return result
                answer = await response.text()
                location = response.headers.get("Location")
                base = response.url
            caller.accept_answer(answer, loop.time())
            pump()
            deadline = loop.time() + 10
            while not caller.is_connected and loop.time() < deadline and not state["closed"]:
                await asyncio.sleep(0.005)
            if not caller.is_connected:
                result.error = f"not connected: {caller.closed_reason or 'timeout'}"
                return result
            start = loop.time()
            frame_index = 0
            next_beep = start + 0.5
            while loop.time() - start < duration and not state["closed"]:
                frame_end = start + (frame_index + 1) * FRAME_SECONDS
                frame_begin = frame_end - FRAME_SECONDS
                beep_sample = None
                if frame_begin <= next_beep < frame_end and state["pending"] is None:
                    beep_sample = int((next_beep - frame_begin) * SAMPLE_RATE)
                    state["pending"] = next_beep
                    result.beeps_sent += 1
                    next_beep += interval
                elif next_beep < frame_begin:
                    next_beep += interval  # skipped while the last beep was pending
                pcm = _frame(beep_sample, rng)
                delay = frame_end - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the frame is "captured" at its end
                for packet in codec.encode(pcm):
                    caller.send_audio(packet, loop.time())
                pump()
                frame_index += 1
                if state["pending"] is not None and loop.time() - state["pending"] > 1.0:
                    state["pending"] = None  # lost beep: stop waiting for it
            if location:
                async with http.delete(str(base.join(_url(location))), headers=headers):
                    pass
    except Exception as error:  # reported in the result, never raised
        result.error = f"{type(error).__name__}: {error}"
    finally:
        caller.close(loop.time())
        pump()
        if timer[0] is not None:
            timer[0].cancel()
        transport.close()
    return result


def _url(location: str):
    from yarl import URL

    return URL(location)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


async def run_probe(
    whip_url: str, *, calls: int, duration: float, interval: float, token: str | None
) -> dict[str, Any]:
    results = await asyncio.gather(
        *(
            probe_call(whip_url, duration=duration, interval=interval, token=token)
            for _ in range(calls)
        )
    )
    latencies = [value for r in results for value in r.latencies]
    sent = sum(r.beeps_sent for r in results)
    heard = sum(r.beeps_heard for r in results)
    ms = [value * 1000 for value in latencies]
    return {
        "benchmark": "latency",
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"calls": calls, "duration_s": duration, "interval_s": interval},
        "what": "beep capture -> echoed onset decoded at the caller: 20 ms frame, Opus "
        "encode+decode, relay, transceiver, backend; no device or jitter buffers",
        "calls_connected": sum(1 for r in results if r.connect_time is not None),
        "errors": [r.error for r in results if r.error],
        "beeps_sent": sent,
        "beeps_heard": heard,
        "mouth_to_ear_ms": {
            "p50": percentile(ms, 0.50),
            "p95": percentile(ms, 0.95),
            "p99": percentile(ms, 0.99),
            "mean": statistics.fmean(ms) if ms else None,
            "min": min(ms) if ms else None,
            "max": max(ms) if ms else None,
        },
        "samples_ms": ms,
    }


def plot_latency(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(report["samples_ms"])
    figure, axis = plt.subplots(figsize=(7, 4))
    if values:
        axis.plot(values, [(i + 1) / len(values) for i in range(len(values))])
    stats = report["mouth_to_ear_ms"]
    for key, style in (("p50", "--"), ("p99", ":")):
        if stats[key] is not None:
            axis.axvline(stats[key], linestyle=style, color="grey", label=f"{key} {stats[key]:.1f}")
    axis.set_xlabel("mouth-to-ear latency through the fleet (ms)")
    axis.set_ylabel("fraction of beeps")
    axis.set_title(f"voxrelay echo, {report['settings']['calls']} calls")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _start_fleet(workdir: Path) -> tuple[Path, str]:
    """A temporary fleet (ports picked by the OS); returns its config and WHIP URL."""
    config = workdir / "fleet.toml"
    config.write_text(
        "\n".join(
            [
                "[fleet]",
                f'name = "latency{os.getpid()}"',
                f'runtime_dir = "{workdir / "run"}"',
                "[relay]",
                'bind = "127.0.0.1"',
                "port = 0",
                "workers = 1",
                "drain_seconds = 0",
                "[metrics]",
                "port = 0",
                "[transceiver]",
                "count = 1",
                "signaling_port = 0",
            ]
        )
        + "\n"
    )
    cli = [sys.executable, "-m", "voxrelay"]
    subprocess.run(
        [*cli, "up", "--detach", "--config", str(config)], check=True, capture_output=True
    )
    status = subprocess.run(
        [*cli, "status", "--json", "--config", str(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return config, json.loads(status.stdout)["signaling_url"] + "whip"


@click.command("latency")
@click.option("--calls", default=4, show_default=True, help="Concurrent probe calls.")
@click.option("--duration", default=10.0, show_default=True, help="Seconds per call.")
@click.option("--interval", default=0.5, show_default=True, help="Seconds between beeps.")
@click.option("--target", default=None, help="WHIP URL of a running fleet (default: start one).")
@click.option("--token", default=None, help="Bearer token for --target.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
def latency_command(
    calls: int, duration: float, interval: float, target: str | None, token: str | None, out
) -> None:
    """Mouth-to-ear latency through relay, transceiver and echo: p50/p95/p99."""
    workdir = None
    config = None
    try:
        if target is None:
            workdir = Path(tempfile.mkdtemp(prefix="voxrelay-latency-"))
            config, target = _start_fleet(workdir)
        report = asyncio.run(
            run_probe(target, calls=calls, duration=duration, interval=interval, token=token)
        )
    finally:
        if config is not None:
            subprocess.run(
                [sys.executable, "-m", "voxrelay", "down", "--now", "--config", str(config)],
                capture_output=True,
            )
    stats = report["mouth_to_ear_ms"]
    click.echo(
        f"{report['calls_connected']}/{calls} calls connected, "
        f"{report['beeps_heard']}/{report['beeps_sent']} beeps heard back"
    )
    if stats["p50"] is not None:
        click.echo(
            f"mouth-to-ear ms: p50 {stats['p50']:.1f}  p95 {stats['p95']:.1f}  "
            f"p99 {stats['p99']:.1f}  (min {stats['min']:.1f}, max {stats['max']:.1f})"
        )
    for error in report["errors"]:
        click.echo(f"error: {error}", err=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").write_text(json.dumps(report, indent=2))
        plot_latency(report, out / "latency.png")
        click.echo(f"wrote {out / 'latency.json'} and {out / 'latency.png'}")
    if report["calls_connected"] < calls or not report["beeps_heard"]:
        raise SystemExit(1)
