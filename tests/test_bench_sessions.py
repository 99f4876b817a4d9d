"""`voxrelay bench sessions`: real fleets, real aiortc servers, real caller processes.

The end-to-end test runs the benchmark through the CLI with tiny parameters in both modes
and checks what it writes (JSON, Markdown, real PNGs, the table), what causality fixes (a
call cannot hear its echo before DTLS is up), which side really transcodes (a transcoded
echo loses the caller's trailer) and that no process is left behind. It never asserts
timings or ratios. The other tests pin down the parts the numbers rest on: the payload is
valid Opus and carries its trailer, the RTT histogram's percentiles, the ICE answers a
full-ICE peer needs, and that a benchmark on loopback never dials a LAN address.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import av
import psutil
import pytest
from aiohttp import ClientSession
from aioice import stun
from click.testing import CliRunner

from voxrelay.bench.callers import (
    MAGIC,
    TRAILER,
    CallerProcess,
    _loopback_candidates_only,
    binding_response,
    histogram_percentile,
    opus_tone,
    padded_prefix,
    read_trailer,
    rtt_bucket,
)
from voxrelay.bench.sessions_bench import (
    MILESTONES,
    AiortcServerProcess,
    CallerPool,
    Progress,
    Series,
    SessionsSettings,
    System,
    aiortc_baselines,
    aiortc_system,
    build_report,
    linear_slope,
    merge_windows,
    parse_baselines,
    plot_cost,
    process_memory,
    render_markdown,
    render_table,
    sessions_command,
)
from voxrelay.proto.dtls import generate_certificate

from fleet import still_running_after

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PASSTHROUGH = ("voxrelay", "aiortc", "aiortc-tap")
TRANSCODING = ("voxrelay-pcm", "aiortc-stock")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_sessions_runs_both_modes_beside_aiortc_and_cleans_up(tmp_path: Path) -> None:
    """Both modes, both passthrough baselines (aiortc's receiver pipeline and the RTP tap)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "voxrelay",
            "bench",
            "sessions",
            *("--calls", "3,6", "--duration", "2", "--mode", "both"),
            *("--baseline", "aiortc,aiortc-tap"),
            *("--idle-calls", "2", "--herd-calls", "3", "--search-steps", "1"),
            *("--soak", "2", "--soak-interval", "1", "--vcpu-hour-usd", "0.04"),
            *("--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

    data = json.loads((out / "sessions.json").read_text())
    assert data["benchmark"] == "voxrelay bench sessions"
    assert data["schema_version"] == 2
    assert data["settings"]["baselines"] == ["aiortc", "aiortc-tap"]
    assert data["settings"]["calls"] == [3, 6]
    assert set(data["servers"]) == {*PASSTHROUGH, *TRANSCODING}

    for name, server in data["servers"].items():
        system = server["system"]
        assert system["transcodes"] == (name in TRANSCODING)
        assert system["is_baseline"] == name.startswith("aiortc")
        assert system["name"] == name
        assert [step["calls"] for step in server["steps"]] == [3, 6], server["stopped"]
        for step in server["steps"]:
            assert step["live"] == step["calls"]
            assert step["sent"] > 0 and step["received"] > 0
            assert 0 <= step["loss"] < 0.05
            if name in PASSTHROUGH:  # the payload came back as it was sent
                assert step["echoes_intact"] > 0 and step["echoes_transcoded"] == 0
                rtt = step["rtt_ms"]
                assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p99"] <= rtt["max"] * 1.01
            else:  # decoded and re-encoded: the trailer in the Opus padding is gone
                assert step["echoes_transcoded"] > 0 and step["echoes_intact"] == 0
                assert step["rtt_ms"] is None
            assert step["server_cores"] > 0
            assert step["millicores_per_call"][system["like_for_like_group"]] > 0
            assert step["callers"]["cores"] > 0
            assert 0 < step["callers"]["share_of_all_cpu"] < 1
            assert all(value > 0 for value in step["pss_mb"].values())
        setup = server["setup"]
        assert (setup["idle"]["ok"], setup["load"]["ok"], setup["herd"]["ok"]) == (2, 6, 3), {
            phase: summary["errors"] for phase, summary in setup.items()
        }
        for phase in ("idle", "load", "herd"):
            assert set(setup[phase]["milestones_ms"]) == set(MILESTONES)
            for call in server["setup_calls"][phase]:
                at = call["ms"]
                # What causality orders (not timings): each step needs the one before.
                assert 0 < at["answer"] < at["ice"] <= at["connected"] < at["first_echo"], call
        assert data["cost"][name]["usd_per_1000_call_minutes"] > 0

    vox = data["servers"]["voxrelay"]
    assert set(vox["system"]["pids"]) == {"transceiver", "relay", "supervisor"}
    assert set(data["servers"]["voxrelay-pcm"]["system"]["pids"]) == {
        "transceiver",
        "relay",
        "supervisor",
        "backend",
    }
    assert len(vox["soak"]["samples"]) == 2
    assert all(
        data["servers"][name]["soak"] is None for name in ("aiortc", "aiortc-tap", *TRANSCODING)
    )
    kinds = {name: s["system"].get("server_kind") for name, s in data["servers"].items()}
    assert kinds == {
        "voxrelay": None,
        "aiortc": "receiver",
        "aiortc-tap": "tap",
        "voxrelay-pcm": None,
        "aiortc-stock": "transcoding",
    }

    comparisons = {(c["mode"], c["baseline_server"]): c for c in data["comparisons"]}
    assert list(comparisons) == [
        ("passthrough", "aiortc"),  # the verdict's baseline comes first
        ("passthrough", "aiortc-tap"),
        ("pcm", "aiortc-stock"),
    ]
    assert comparisons["passthrough", "aiortc"]["transcodes"] == {
        "voxrelay": False,
        "baseline": False,
    }
    assert comparisons["pcm", "aiortc-stock"]["transcodes"] == {"voxrelay": True, "baseline": True}
    for key, comparison in comparisons.items():
        assert comparison["cpu_advantage"]["transceiver"] > 0
        reference = key[1] == "aiortc-tap"
        assert comparison["informational"] == reference
        assert comparison["role"] == ("reference" if reference else "target")
        for verdict in (
            comparison["cpu_advantage"]["pass"],
            comparison["memory_per_call_kib"]["pass"],
        ):
            assert verdict is None if reference else isinstance(verdict, bool)
    assert comparisons["pcm", "aiortc-stock"]["cpu_advantage"]["transceiver_and_backend"] > 0
    assert data["callers"]["processes"] == 2
    assert 0 < data["callers"]["max_share_of_all_cpu"] < 1

    for png in ("sessions_setup", "sessions_load", "sessions_cpu_memory", "sessions_soak"):
        assert (out / f"{png}.png").read_bytes().startswith(PNG_MAGIC), png
    markdown = (out / "sessions.md").read_text()
    for name in (*PASSTHROUGH, *TRANSCODING):
        assert f"| {name} |" in markdown
    assert "voxrelay bench sessions --calls 3,6" in markdown
    assert "mc/call" in result.stdout and ("PASS" in result.stdout or "MISS" in result.stdout)
    assert "voxrelay vs aiortc-tap (REFERENCE only: no verdict)" in result.stdout
    assert "voxrelay: 6 calls" in result.stderr  # the progress bars

    # Nothing left running: fleets, backend, aiortc servers and callers are gone.
    pids = [p for s in data["servers"].values() for g in s["system"]["pids"].values() for p in g]
    pids += data["callers"]["pids"]
    assert len(pids) == 3 + 1 + 1 + 4 + 1 + 2
    assert still_running_after(pids, timeout=10) == []


def test_caller_payloads_are_valid_opus_carrying_their_trailer() -> None:
    """A transcoding peer must decode what the callers send; a passthrough echo gives back
    the trailer (sequence number and send time) intact."""
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "mono"
    packets = opus_tone(frames=10)
    for sequence, packet in enumerate(packets):
        payload = padded_prefix(packet) + TRAILER.pack(MAGIC, sequence, 1_234_567 + sequence)
        assert 60 <= len(payload) <= 160  # Opus-sized
        assert payload[0] & 3 == 3  # code 3: frame count byte, then padding
        frames = decoder.decode(av.Packet(payload))
        assert sum(frame.samples for frame in frames) == 960
        assert read_trailer(payload) == (sequence, 1_234_567 + sequence)
    assert read_trailer(packets[0]) is None  # a re-encoded packet has no trailer
    assert read_trailer(b"\x78") is None


def test_padded_prefix_takes_only_single_frame_packets() -> None:
    with pytest.raises(ValueError):
        padded_prefix(b"\x79" + b"\x00" * 20)  # code 1: two frames
    with pytest.raises(ValueError):
        padded_prefix(b"")
    with pytest.raises(ValueError):
        padded_prefix(b"\x78\x01", padding=255)


def test_histogram_percentiles_are_within_a_bucket_of_the_exact_ones() -> None:
    rng = random.Random(7)
    rtts_ns = [int(rng.lognormvariate(math.log(600_000), 1.2)) for _ in range(20_000)]
    histogram: dict[int, int] = {}
    for rtt in rtts_ns:
        histogram[rtt_bucket(rtt)] = histogram.get(rtt_bucket(rtt), 0) + 1
    ordered = sorted(rtts_ns)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        exact_us = ordered[math.ceil(fraction * len(ordered)) - 1] / 1000
        estimate_us = histogram_percentile(histogram, fraction)
        assert estimate_us is not None
        assert abs(estimate_us / exact_us - 1) < 0.011, fraction
    assert histogram_percentile({}, 0.5) is None


def test_merge_windows_adds_every_process_counts() -> None:
    def reply(sent: int, echoed: int, buckets: dict[str, int], live: int) -> dict:
        return {
            "window": {
                "sent": sent,
                "echoed": echoed,
                "reordered": 1,
                "foreign": 0,
                "late_ticks": 2,
                "rtt_histogram": buckets,
                "rtt_sum_ns": echoed * 1_000_000,
                "rtt_min_ns": 500_000,
                "rtt_max_ns": 3_000_000,
            },
            "live": live,
        }

    one_ms, two_ms = str(rtt_bucket(1_000_000)), str(rtt_bucket(2_000_000))
    merged = merge_windows(
        [reply(100, 99, {one_ms: 99}, 2), reply(100, 100, {one_ms: 50, two_ms: 50}, 3)]
    )
    assert (merged["sent"], merged["echoed"], merged["reordered"], merged["live"]) == (
        200,
        199,
        2,
        5,
    )
    assert merged["late_ticks"] == 4
    assert merged["rtt_ms"]["p50"] == pytest.approx(1.0, rel=0.011)
    assert merged["rtt_ms"]["p99"] == pytest.approx(2.0, rel=0.011)
    assert merged["rtt_ms"]["mean"] == pytest.approx(1.0)
    assert (merged["rtt_ms"]["min"], merged["rtt_ms"]["max"]) == (0.5, 3.0)
    silent = merge_windows([reply(10, 0, {}, 1)])
    assert silent["rtt_ms"] is None


def test_linear_slope() -> None:
    assert linear_slope([(0, 1), (10, 21), (20, 41)]) == pytest.approx(2.0)
    assert linear_slope([(5, 1), (5, 2)]) is None


_TOUCH_SHARED_PAGES = """
import sys
from multiprocessing import resource_tracker, shared_memory
segment = shared_memory.SharedMemory(name=sys.argv[1])
resource_tracker.unregister(segment._name, "shared_memory")  # the test owns it
print("attached", flush=True)
sys.stdin.readline()
view = segment.buf
for offset in range(0, len(view), 4096):
    view[offset] = 1
print("touched", flush=True)
sys.stdin.readline()
"""


def test_memory_counts_pages_shared_by_two_processes_once() -> None:
    """Two processes that touch the same 16 MiB of shared memory (the relay workers and the
    routing table) add 16 MiB to the fleet's memory, not 32: what RSS would report."""
    size = 16 * 2**20
    segment = shared_memory.SharedMemory(create=True, size=size)
    children = []
    try:
        for _ in range(2):
            child = subprocess.Popen(
                [sys.executable, "-c", _TOUCH_SHARED_PAGES, segment.name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            assert child.stdout.readline().strip() == "attached"
        handles = [psutil.Process(child.pid) for child in children]
        before = sum(process_memory(handle) for handle in handles)
        rss_before = sum(handle.memory_info().rss for handle in handles)
        for child in children:
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "touched"
        added = sum(process_memory(handle) for handle in handles) - before
        rss_added = sum(handle.memory_info().rss for handle in handles) - rss_before
        assert abs(added - size) < size * 0.1, added / 2**20
        assert rss_added > size * 1.8, rss_added / 2**20  # why RSS would mislead
    finally:
        for child in children:
            child.kill()
            child.wait()
        segment.close()
        segment.unlink()


def test_binding_response_answers_a_signed_check_and_nothing_else() -> None:
    """aiortc (full ICE) completes only when its own checks are answered."""
    local_pwd, peer = "caller-ice-password-1234", ("127.0.0.1", 40_000)
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.attributes["USERNAME"] = "callerufrag:peerufrag"
    request.attributes["PRIORITY"] = 1234
    request.add_message_integrity(local_pwd.encode())

    answer = binding_response(bytes(request), local_pwd, peer)
    assert answer is not None
    response = stun.parse_message(answer)
    assert response.check_message_integrity(local_pwd.encode())
    assert response.message_class == stun.Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.attributes["XOR-MAPPED-ADDRESS"] == peer
    assert "FINGERPRINT" in response.attributes

    assert binding_response(bytes(request), "another-password-123456", peer) is None
    assert binding_response(bytes(request), local_pwd, None) is None
    assert binding_response(b"\x00\x01" + b"\xff" * 30, local_pwd, peer) is None
    indication = stun.Message(stun.Method.BINDING, stun.Class.INDICATION)
    indication.add_message_integrity(local_pwd.encode())
    assert binding_response(bytes(indication), local_pwd, peer) is None


def test_a_loopback_caller_never_takes_a_lan_candidate() -> None:
    answer = "\r\n".join(
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=candidate:1 1 udp 2130706431 192.0.2.2 50000 typ host",
            "a=candidate:2 1 udp 2130706430 127.0.0.1 50001 typ host",
            "a=candidate:3 1 udp 2130706429 garbage",
            "a=end-of-candidates",
        ]
    )
    kept = _loopback_candidates_only(answer, "127.0.0.1")
    assert "192.0.2.2" not in kept and "garbage" not in kept
    assert "127.0.0.1 50001" in kept and "a=end-of-candidates" in kept
    assert _loopback_candidates_only(answer, "192.0.2.7") == answer  # not a loopback run


@pytest.mark.parametrize(
    "calls",
    ["100,50", "0,10", "ten", "", "50,50"],
    ids=["decreasing", "zero", "word", "none", "duplicate"],
)
def test_calls_must_be_increasing_positive_counts(calls: str) -> None:
    result = CliRunner().invoke(sessions_command, ["--calls", calls])
    assert result.exit_code == 2
    assert "--calls" in result.output


def test_pcm_mode_refuses_a_target() -> None:
    result = CliRunner().invoke(
        sessions_command, ["--mode", "pcm", "--target", "http://127.0.0.1:9/status"]
    )
    assert result.exit_code == 2
    assert "pcm mode starts its own fleet" in result.output


def test_trailer_layout_is_stable() -> None:
    """The trailer is the last bytes of the payload: magic, sequence, send time."""
    assert TRAILER.size == 20
    assert struct.unpack("!4sQQ", TRAILER.pack(MAGIC, 1, 2)) == (MAGIC, 1, 2)


# -- the like-for-like aiortc baseline: aiortc's receiver pipeline, Opus passed through -----


def _settings(**overrides: Any) -> SessionsSettings:
    values: dict[str, Any] = {
        "calls": (2, 4),
        "pcm_calls": (2, 4),
        "duration": 1.5,
        "baselines": ("aiortc",),
        "modes": ("passthrough",),
        "target": None,
        "token": None,
        "caller_processes": 1,
        "ramp_rate": 50.0,
        "idle_calls": 1,
        "herd_calls": 0,
        "rtt_p99_ms": 50.0,
        "max_loss": 0.001,
        "search_steps": 2,
        "soak": 0.0,
        "soak_calls": 2,
        "soak_interval": 10.0,
        "call_timeout": 10.0,
        "vcpu_hour_usd": 0.04,
        "transceivers": 1,
        "workers": 1,
    }
    values.update(overrides)
    return SessionsSettings(**values)


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[AiortcServerProcess]:
    server = AiortcServerProcess("receiver")
    try:
        yield server
    finally:
        server.close()


def _receiver_system(server: AiortcServerProcess) -> System:
    (baseline,) = aiortc_baselines(("aiortc",), "passthrough")
    return aiortc_system(baseline, server.info["whip_url"], server.process.pid)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_receiver_baseline_echoes_every_payload_byte_for_byte(
    receiver_server: AiortcServerProcess,
) -> None:
    """RTCRtpReceiver (jitter buffer, decoder thread with the decoder swapped), the track,
    RTCRtpSender: what the caller hears is exactly what it sent, and every echo went
    through the swapped decoder (no Opus decode or encode)."""

    async def two_calls() -> tuple[CallerProcess, list[dict], list[bytes]]:
        process = CallerProcess(generate_certificate(time.time()))
        echoes: list[bytes] = []
        count_echo = process._echo

        def keep_echo(call: Any, payload: bytes, now: float, arrival_ns: int) -> None:
            echoes.append(bytes(payload))
            count_echo(call, payload, now, arrival_ns)

        process._echo = keep_echo  # type: ignore[method-assign]
        async with ClientSession() as http:
            process.http = http
            process.start_ticking()
            try:
                dialed = await process.dial(receiver_server.info["whip_url"], 2, 0, "t", 10, None)
                await asyncio.sleep(1.5)
            finally:
                await process.hang_up(None, delete=True)
                if process._tick_handle is not None:
                    process._tick_handle.cancel()
        return process, dialed["calls"], echoes

    process, calls, echoes = asyncio.run(two_calls())
    assert [call["ok"] for call in calls] == [True, True], calls
    assert echoes
    for payload in echoes:
        trailer = read_trailer(payload)
        assert trailer is not None, payload.hex()
        sequence, sent_ns = trailer
        sent = process.prefixes[sequence % len(process.prefixes)] + TRAILER.pack(
            MAGIC, sequence, sent_ns
        )
        assert payload == sent
    status_url = receiver_server.info["whip_url"].removesuffix("/whip") + "/status"
    with urllib.request.urlopen(status_url, timeout=5) as response:
        status = json.load(response)
    assert status["frames_passed_through"] >= len(echoes)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_receiver_baseline_keeps_up_and_is_not_searched_below_its_jitter_buffer(
    receiver_server: AiortcServerProcess, tmp_path: Path
) -> None:
    """The benchmark's own series against it: intact echoes counted at every step, the
    ramp not stopped by the round trip, and no capacity search below the first step.

    The p99 limit here is 20 ms: aiortc's audio jitter buffer releases a packet only once
    four later ones have come, which the caller sends 20 ms apart, so every echo is held
    for about 80 ms whatever the load - an order, not a timing.
    """
    settings = _settings(rtt_p99_ms=20.0, max_loss=0.05)

    async def run() -> dict[str, Any]:
        pool = CallerPool(1, tmp_path / "callers.log")
        try:
            await pool.start()
            series = Series(
                _receiver_system(receiver_server), pool, settings, Progress(enabled=False)
            )
            await series.run(soak=False)
            await pool.hang_up()
            return series.summary()
        finally:
            await pool.close()

    summary = asyncio.run(run())
    assert summary["system"]["server_kind"] == "receiver"
    assert summary["system"]["baseline_role"] == "target"
    assert [step["calls"] for step in summary["steps"]] == [2, 4], summary["stopped"]
    assert summary["stopped"] is None
    for step in summary["steps"]:
        assert step["live"] == step["calls"]
        assert step["echoes_intact"] > 0 and step["echoes_transcoded"] == 0
        assert step["received"] == step["echoes_intact"] <= step["sent"]
        assert step["loss"] < 0.05
        assert step["refused_by"] == ["rtt"] and not step["accepted"]
    assert summary["setup"]["idle"]["ok"] == 1
    assert summary["search"] == []
    assert "not searched below 2 calls" in summary["search_note"]
    assert "its jitter buffer holds each echo ~80 ms" in summary["search_note"]
    assert summary["capacity"] is None
    assert summary["capacity_note"].startswith(
        "none within p99 < 20 ms (its jitter buffer holds each echo ~80 ms)"
    )
    assert summary["cpu_bound"]["at_calls"] == 4 and summary["cpu_bound"]["calls_per_core"] > 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", ()),
        ("aiortc", ("aiortc",)),
        ("aiortc-tap", ("aiortc-tap",)),
        ("aiortc-tap, aiortc", ("aiortc", "aiortc-tap")),
        ("AIORTC", ("aiortc",)),
    ],
)
def test_baseline_is_none_one_or_a_comma_list(value: str, expected: tuple[str, ...]) -> None:
    assert parse_baselines(value) == expected


@pytest.mark.parametrize(
    "value",
    ["aiortc,aiortc", "stock", "", "none,aiortc", "aiortc,", "aiortc;aiortc-tap"],
    ids=["twice", "unknown", "empty", "none-and-one", "trailing-comma", "semicolon"],
)
def test_baseline_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValueError, match="expected none, aiortc, aiortc-tap"):
        parse_baselines(value)
    result = CliRunner().invoke(sessions_command, ["--baseline", value])
    assert result.exit_code == 2
    assert "--baseline" in result.output


def test_the_tap_baseline_is_passthrough_only() -> None:
    result = CliRunner().invoke(sessions_command, ["--baseline", "aiortc-tap", "--mode", "pcm"])
    assert result.exit_code == 2
    assert "passthrough mode only" in result.output
    assert [b.name for b in aiortc_baselines(("aiortc", "aiortc-tap"), "pcm")] == ["aiortc-stock"]


def _summary(
    system: System,
    settings: SessionsSettings,
    steps: list[tuple[int, float, float, float]],
    search: list[tuple[int, float, float, float]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """A series' summary from synthetic windows: (calls, cores of the like-for-like group,
    KiB per call it added, p99 ms) each, 2 s long, no packet lost; ``search`` windows come
    after the ramp's, as bisection steps."""
    series = Series(system, None, settings, Progress(enabled=False))  # type: ignore[arg-type]
    base = 50 * 2**20
    series.baseline_pss = {group: base for group in system.processes}
    for index, (calls, cores, kib_per_call, p99) in enumerate([*steps, *search]):
        rtt = {"p50": p99 / 2, "p95": p99, "p99": p99, "mean": p99 / 2, "min": 0.1, "max": p99}
        merged = {"sent": calls * 100, "echoed": calls * 100, "reordered": 0, "foreign": 0}
        merged |= {"late_ticks": 0, "rtt_ms": rtt, "live": calls}
        groups = list(system.processes)
        step = series._step(
            calls,
            2.0,
            merged,
            dict.fromkeys(groups, 0.0),
            {g: (cores if g == system.like_for_like else 0.01) * 2.0 for g in groups},
            [0.0],
            [0.2],
            {
                g: base + (kib_per_call * 1024 * calls if g == system.like_for_like else 0)
                for g in groups
            },
            30 * 2**20,
        )
        step["contention"] = dict.fromkeys(
            ("server_wait_cores", "callers_wait_cores", "machine_cpu_pressure")
        )
        (series.steps if index < len(steps) else series.search).append(step)
    return series.summary()


def test_a_saturated_step_does_not_speak_for_memory_cost_or_the_summary_row() -> None:
    """Memory per call comes from the ramp's kept-up steps only (a heap grown while
    saturated stays grown in the search steps after it); the row and the cost describe the
    capacity, else the largest kept-up step, never the saturated one."""
    from voxrelay.bench.sessions_bench import cost, representative_step

    settings = _settings()
    system = aiortc_system(aiortc_baselines(["aiortc-tap"], "passthrough")[0], "http://x/whip", 1)
    summary = _summary(
        system,
        settings,
        [(5, 0.25, 500.0, 5.0), (10, 0.5, 500.0, 5.0), (20, 0.95, 30_000.0, 900.0)],
        search=[(15, 0.8, 20_000.0, 5.0)],  # kept up, but its heap is the saturated one's
    )
    assert 450 <= summary["memory"]["like_for_like_kib_per_call_slope"] <= 550
    assert representative_step(summary)["calls"] == 15  # the capacity
    assert cost(summary, 0.04)["at_calls"] == 15

    held = aiortc_system(aiortc_baselines(["aiortc"], "passthrough")[0], "http://x/whip", 1)
    summary = _summary(
        held, settings, [(50, 0.5, 270.0, 83.0), (100, 0.95, 300.0, 240.0)]
    )  # over the round-trip limit at every step; saturated at 100
    assert summary["capacity"] is None
    assert representative_step(summary)["calls"] == 50
    assert (
        cost(summary, 0.04)["millicores_per_call"]
        == summary["steps"][0]["server_millicores_per_call"]
    )


def test_the_verdict_is_against_aiortcs_receiver_and_the_tap_is_a_reference(
    tmp_path: Path,
) -> None:
    """aiortc (receiver) fails the round trip limit at every step - its jitter buffer - yet
    kept up: its CPU and memory per call are compared at the largest common count."""
    settings = _settings(calls=(25, 50), baselines=("aiortc", "aiortc-tap"))
    receiver, tap = aiortc_baselines(settings.baselines, "passthrough")
    url = "http://127.0.0.1:9/whip"
    voxrelay = System(
        name="voxrelay",
        mode="passthrough",
        whip_url=url,
        processes={"transceiver": [1], "relay": [2]},
        like_for_like="transceiver",
        transcodes=False,
        echo="in-process echo backend",
    )
    results = {  # the reference first: the order of the runs must not pick the verdict
        "aiortc-tap": _summary(
            aiortc_system(tap, url, 3), settings, [(25, 0.1, 100, 3), (50, 0.2, 100, 4)]
        ),
        "voxrelay": _summary(voxrelay, settings, [(25, 0.025, 10, 1), (50, 0.05, 10, 2)]),
        "aiortc": _summary(
            aiortc_system(receiver, url, 4), settings, [(25, 0.25, 200, 95), (50, 0.5, 200, 97)]
        ),
    }
    data = build_report(settings, results, [5])
    data["command"] = "voxrelay bench sessions --baseline aiortc,aiortc-tap"
    assert data["schema_version"] == 2

    target, reference = data["comparisons"]
    assert (target["baseline_server"], target["role"], target["informational"]) == (
        "aiortc",
        "target",
        False,
    )
    assert (reference["baseline_server"], reference["role"], reference["informational"]) == (
        "aiortc-tap",
        "reference",
        True,
    )
    for comparison in (target, reference):
        assert comparison["reference_calls"] == 50 and comparison["reference_kept_up"]
    assert target["millicores_per_call"]["baseline"] == pytest.approx(10.0)
    assert target["cpu_advantage"]["transceiver"] == pytest.approx(10.0)
    assert target["cpu_advantage"]["pass"] is True
    assert target["memory_per_call_kib"]["ratio_transceiver"] == pytest.approx(0.05, rel=0.1)
    assert target["memory_per_call_kib"]["pass"] is True
    assert reference["cpu_advantage"]["transceiver"] == pytest.approx(4.0)  # a MISS, were it judged
    assert reference["cpu_advantage"]["pass"] is None
    assert reference["cpu_advantage"]["pass_all_processes"] is None
    assert reference["memory_per_call_kib"]["pass"] is None

    aiortc = data["servers"]["aiortc"]
    assert aiortc["capacity"] is None
    assert aiortc["capacity_note"].startswith(
        "none within p99 < 50 ms (its jitter buffer holds each echo ~80 ms): p99 95 ms already "
        "at 25 calls"
    )
    assert aiortc["cpu_bound"] == {"at_calls": 50, "kept_up": True, "calls_per_core": 100.0}
    assert data["servers"]["aiortc-tap"]["capacity"]["calls"] == 50

    table = render_table(data)
    assert "voxrelay vs aiortc: " in table and "PASS" in table
    assert "voxrelay vs aiortc-tap (REFERENCE only: no verdict)" in table
    assert "none within p99 < 50 ms (its jitter buffer holds each echo ~80 ms)" in table
    assert "CPU-bound 100 calls per core (at 50 calls)" in table
    markdown = render_markdown(data)
    assert "passthrough: aiortc uses 10.0x the CPU per call" in markdown
    assert "passthrough (for reference only, no verdict): aiortc-tap uses 4.0x" in markdown
    assert "| aiortc | passthrough, through RTCRtpReceiver and its jitter buffer | none * |" in (
        markdown
    )
    assert plot_cost(data, tmp_path / "cost.png").read_bytes().startswith(PNG_MAGIC)
