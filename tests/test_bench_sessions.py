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

import json
import math
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import psutil
import pytest
from aioice import stun
from click.testing import CliRunner

from voxrelay.bench.callers import (
    MAGIC,
    TRAILER,
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
    linear_slope,
    merge_windows,
    sessions_command,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PASSTHROUGH = ("voxrelay", "aiortc")
TRANSCODING = ("voxrelay-pcm", "aiortc-stock")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_sessions_runs_both_modes_beside_aiortc_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "voxrelay",
            "bench",
            "sessions",
            *("--calls", "3,6", "--duration", "2", "--baseline", "aiortc", "--mode", "both"),
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
    assert data["schema_version"] == 1
    assert data["settings"]["calls"] == [3, 6]
    assert set(data["servers"]) == {*PASSTHROUGH, *TRANSCODING}

    for name, server in data["servers"].items():
        system = server["system"]
        assert system["transcodes"] == (name in TRANSCODING)
        assert system["is_baseline"] == name.startswith("aiortc")
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
            assert all(value > 0 for value in step["rss_mb"].values())
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
    assert all(data["servers"][name]["soak"] is None for name in ("aiortc", *TRANSCODING))

    comparisons = {c["mode"]: c for c in data["comparisons"]}
    assert set(comparisons) == {"passthrough", "pcm"}
    assert comparisons["passthrough"]["transcodes"] == {"voxrelay": False, "baseline": False}
    assert comparisons["pcm"]["transcodes"] == {"voxrelay": True, "baseline": True}
    for comparison in comparisons.values():
        assert comparison["cpu_advantage"]["transceiver"] > 0
        assert isinstance(comparison["cpu_advantage"]["pass"], bool)
        assert isinstance(comparison["memory_per_call_kib"]["pass"], bool)
    assert comparisons["pcm"]["cpu_advantage"]["transceiver_and_backend"] > 0
    assert data["callers"]["processes"] == 2
    assert 0 < data["callers"]["max_share_of_all_cpu"] < 1

    for png in ("sessions_setup", "sessions_load", "sessions_cpu_memory", "sessions_soak"):
        assert (out / f"{png}.png").read_bytes().startswith(PNG_MAGIC), png
    markdown = (out / "sessions.md").read_text()
    assert "| voxrelay |" in markdown and "| aiortc-stock |" in markdown
    assert "voxrelay bench sessions --calls 3,6" in markdown
    assert "mc/call" in result.stdout and ("PASS" in result.stdout or "MISS" in result.stdout)
    assert "voxrelay: 6 calls" in result.stderr  # the progress bars

    # Nothing left running: fleets, backend, aiortc servers and callers are gone.
    pids = [p for s in data["servers"].values() for g in s["system"]["pids"].values() for p in g]
    pids += data["callers"]["pids"]
    assert len(pids) == 3 + 1 + 4 + 1 + 2
    deadline = time.monotonic() + 10
    while [pid for pid in pids if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
